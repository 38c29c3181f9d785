//! Times as Redis gives them, read as ms since the epoch: `TIME`'s pair, and sorted-set
//! scores that anyone with write access may have set to anything.

use std::time::Duration;

/// Redis `TIME` (seconds, microseconds) in ms since the epoch.
pub(super) fn time_ms((secs, micros): (u64, u64)) -> u64 {
    secs.saturating_mul(1000).saturating_add(micros / 1000)
}

/// A sorted-set score that holds ms since the epoch. Anyone with write access can put any
/// score there: NaN and negatives count as 0, and huge values as the far future.
pub(super) fn score_ms(score: f64) -> u64 {
    if score.is_nan() || score <= 0.0 {
        0
    } else if score >= 1.8e19 {
        u64::MAX
    } else {
        // In range and whole after `trunc`: the conversion is exact.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let ms = score.trunc() as u64;
        ms
    }
}

/// A duration in whole ms, saturating.
pub(super) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_scores_and_times_never_overflow() {
        assert_eq!(score_ms(f64::NAN), 0);
        assert_eq!(score_ms(-5.0), 0);
        assert_eq!(score_ms(f64::INFINITY), u64::MAX);
        assert_eq!(score_ms(1_700_000_000_123.9), 1_700_000_000_123);
        assert_eq!(time_ms((u64::MAX, 999_999)), u64::MAX);
        assert_eq!(time_ms((2, 5_000)), 2_005);
    }
}
