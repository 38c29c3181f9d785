//! Where environment variables come from: the process, a systemd instance's derived
//! defaults over it, or (in tests) a closure, so no test mutates the process's environment.

/// Where settings come from: the environment is a parameter so tests need not mutate the
/// process's own.
pub trait Env {
    /// The variable's value; `None` when it is not set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// The environment of a systemd instance `worker@N` run with `--instance N`: WORKER_ID defaults
/// to `worker-N` and WORKER_METRICS_PORT to 9100 + N - 1; set either variable to override it.
pub struct InstanceEnv<E: Env> {
    /// N, the number of the instance `worker@N`.
    pub instance: u32,
    /// The environment whose variables win over the derived ones.
    pub env: E,
}

impl<E: Env> Env for InstanceEnv<E> {
    fn var(&self, name: &str) -> Option<String> {
        self.env.var(name).or_else(|| match name {
            "WORKER_ID" => Some(format!("worker-{}", self.instance)),
            "WORKER_METRICS_PORT" => Some((9099 + u64::from(self.instance)).to_string()),
            _ => None,
        })
    }
}

impl<F: Fn(&str) -> Option<String>> Env for F {
    fn var(&self, name: &str) -> Option<String> {
        self(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::env;
    use crate::config::Settings;

    #[test]
    fn an_instance_number_derives_id_and_port_unless_the_environment_says_otherwise() {
        let derived = InstanceEnv {
            instance: 3,
            env: env(&[]),
        };
        let s = Settings::load(None, &derived).unwrap();
        assert_eq!((s.worker.id.as_str(), s.metrics.port), ("worker-3", 9102));
        let overridden = InstanceEnv {
            instance: 3,
            env: env(&[("WORKER_METRICS_PORT", "9200"), ("WORKER_ID", "special")]),
        };
        let s = Settings::load(None, &overridden).unwrap();
        assert_eq!((s.worker.id.as_str(), s.metrics.port), ("special", 9200));
    }
}
