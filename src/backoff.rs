//! The one wait between tries while Redis (or a sentinel) does not answer.

use std::time::Duration;

/// Capped exponential backoff: 100 ms doubling to 5 s.
#[derive(Default)]
pub(crate) struct Backoff {
    pub(crate) attempts: u32,
}

impl Backoff {
    pub(crate) fn next(&mut self) -> Duration {
        let delay = Duration::from_millis(100) * 2u32.saturating_pow(self.attempts.min(6));
        self.attempts += 1;
        delay.min(Duration::from_secs(5))
    }

    pub(crate) fn reset(&mut self) {
        self.attempts = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let mut b = Backoff::default();
        let delays: Vec<u128> = (0..8).map(|_| b.next().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(100));
    }
}
