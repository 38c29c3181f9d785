//! What the config tests share: an environment made of pairs, and settings loaded from a
//! config file's text.

use std::collections::HashMap;

use super::{ConfigError, Settings};

/// An environment holding only these variables.
pub(super) fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    move |name: &str| map.get(name).cloned()
}

/// Settings from `yaml` written to a config file, and an environment of `vars`.
pub(super) fn load_yaml(yaml: &str, vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    Settings::load(Some(&path), &env(vars))
}
