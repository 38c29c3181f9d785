//! Which dead letters a command acts on: `Filter`, typed, and `FilterText`, the filter as the
//! HTTP API and the page send it, with the time bounds both accept.

use chrono::{DateTime, Utc};

use super::Letter;

/// Which dead letters a command acts on. Empty: all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Filter {
    /// Any of these reasons (`rejected`, `exhausted`, `invalid_json`, ...).
    pub reason: Vec<String>,
    /// Any of these HTTP statuses of the main server's last answer.
    pub status: Vec<u16>,
    /// Dead at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Dead before this time.
    pub until: Option<DateTime<Utc>>,
    /// Plain text anywhere in the record: the message or the error.
    pub grep: Option<String>,
    /// Any of these message ids.
    pub ids: Vec<String>,
}

impl Filter {
    /// No condition at all: every dead letter.
    pub(crate) fn is_empty(&self) -> bool {
        self.reason.is_empty()
            && self.status.is_empty()
            && self.since.is_none()
            && self.until.is_none()
            && self.grep.as_deref().is_none_or(str::is_empty)
            && self.ids.is_empty()
    }

    /// The text to look for in Redis (empty: none).
    pub(super) fn grep_text(&self) -> &str {
        self.grep.as_deref().unwrap_or("")
    }

    /// Whether a letter passes every condition (the grep was checked in Redis: `hit`).
    pub(crate) fn matches(&self, letter: &Letter, hit: bool) -> bool {
        if !hit {
            return false;
        }
        if !self.reason.is_empty() && !self.reason.iter().any(|r| r == letter.reason()) {
            return false;
        }
        if !self.status.is_empty() && !letter.status().is_some_and(|s| self.status.contains(&s)) {
            return false;
        }
        if self.since.is_some() || self.until.is_some() {
            let Some(at) = letter.dead_at() else {
                return false;
            };
            let too_early = self.since.is_some_and(|since| at < since);
            let too_late = self.until.is_some_and(|until| at >= until);
            if too_early || too_late {
                return false;
            }
        }
        let named = |id: &str| self.ids.iter().any(|w| w == id);
        if !self.ids.is_empty() && !letter.message_id().is_some_and(named) {
            return false;
        }
        true
    }
}

/// A filter as text, the way the HTTP API (query parameters or a JSON body) and the page send
/// it: lists comma-separated or as arrays, times as RFC 3339 or durations.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct FilterText {
    /// Reasons, comma-separated.
    pub reason: Option<String>,
    /// HTTP statuses, comma-separated.
    pub status: Option<String>,
    /// An RFC 3339 time or a duration back from now (`2h`).
    pub since: Option<String>,
    /// An RFC 3339 time or a duration back from now.
    pub until: Option<String>,
    /// Plain text anywhere in the record.
    pub grep: Option<String>,
    /// Message ids.
    pub ids: Vec<String>,
}

impl FilterText {
    /// The filter, or what is wrong with it (naming the field).
    pub(crate) fn parse(&self, now: DateTime<Utc>) -> Result<Filter, String> {
        let list = |text: &Option<String>| -> Vec<String> {
            text.as_deref()
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        };
        let status = list(&self.status)
            .iter()
            .map(|s| {
                s.parse::<u16>()
                    .map_err(|_| format!("status: {s:?} is not an HTTP status such as 422"))
            })
            .collect::<Result<_, _>>()?;
        let time = |name: &str, text: &Option<String>| {
            text.as_deref()
                .filter(|t| !t.trim().is_empty())
                .map(|t| parse_time_bound(t, now).map_err(|e| format!("{name}: {e}")))
                .transpose()
        };
        Ok(Filter {
            reason: list(&self.reason),
            status,
            since: time("since", &self.since)?,
            until: time("until", &self.until)?,
            grep: self.grep.clone().filter(|g| !g.is_empty()),
            ids: self.ids.iter().filter(|i| !i.is_empty()).cloned().collect(),
        })
    }
}

/// A time bound for `--since` / `--until`: RFC 3339 (`2025-01-15T10:00:00Z`) or a duration
/// back from `now` (`90s`, `30m`, `2h`, `7d`).
pub(crate) fn parse_time_bound(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    let bad = || {
        format!(
            "{text:?} is neither an RFC 3339 time (2025-01-15T10:00:00Z) nor a duration such as \
             90s, 30m, 2h or 7d"
        )
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    let back = number
        .checked_mul(seconds)
        .and_then(|s| i64::try_from(s).ok())
        .and_then(chrono::TimeDelta::try_seconds)
        .ok_or_else(bad)?;
    now.checked_sub_signed(back).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::DeadSlot;

    #[test]
    fn time_bounds_are_rfc3339_or_durations_back_from_now() {
        let now = DateTime::parse_from_rfc3339("2025-01-15T12:00:00Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap();
        assert_eq!(
            parse_time_bound("2h", now).unwrap().to_rfc3339(),
            "2025-01-15T10:00:00+00:00"
        );
        assert_eq!(
            parse_time_bound("90s", now).unwrap().to_rfc3339(),
            "2025-01-15T11:58:30+00:00"
        );
        assert_eq!(
            parse_time_bound("1d", now).unwrap().to_rfc3339(),
            "2025-01-14T12:00:00+00:00"
        );
        assert_eq!(
            parse_time_bound("2025-01-01T00:00:00+01:00", now).unwrap().to_rfc3339(),
            "2024-12-31T23:00:00+00:00"
        );
        for bad in ["", "2", "h", "2w", "-2h", "99999999999999999999h", "1e3s"] {
            assert!(parse_time_bound(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn filters_combine_every_condition() {
        let letter = Letter::read(DeadSlot {
            position: 1,
            size: 0,
            bytes: concat!(
                r#"{"reason":"rejected","error":"main server answered HTTP 422: no","#,
                r#""dead_at":"2025-01-15T10:00:00.000Z","message_id":"m-1"}"#,
                "\n",
                r#"{"message_id":"m-1"}"#,
            )
            .as_bytes()
            .to_vec(),
            hit: true,
            sha: String::new(),
        });
        let at = |t: &str| DateTime::parse_from_rfc3339(t).map(|t| t.with_timezone(&Utc)).ok();
        let yes = [
            Filter::default(),
            Filter {
                reason: vec!["exhausted".into(), "rejected".into()],
                ..Filter::default()
            },
            Filter {
                status: vec![422],
                ..Filter::default()
            },
            Filter {
                since: at("2025-01-15T10:00:00Z"),
                until: at("2025-01-15T10:00:01Z"),
                ..Filter::default()
            },
            Filter {
                ids: vec!["m-1".into()],
                ..Filter::default()
            },
        ];
        for filter in &yes {
            assert!(filter.matches(&letter, true), "{filter:?}");
        }
        assert!(!Filter::default().matches(&letter, false), "the grep missed");
        let no = [
            Filter {
                reason: vec!["exhausted".into()],
                ..Filter::default()
            },
            Filter {
                status: vec![500],
                ..Filter::default()
            },
            Filter {
                since: at("2025-01-15T10:00:01Z"),
                ..Filter::default()
            },
            Filter {
                until: at("2025-01-15T10:00:00Z"),
                ..Filter::default()
            },
            Filter {
                ids: vec!["m-2".into()],
                ..Filter::default()
            },
        ];
        for filter in &no {
            assert!(!filter.matches(&letter, true), "{filter:?}");
        }
        assert!(Filter::default().is_empty());
        assert!(Filter {
            grep: Some(String::new()),
            ..Filter::default()
        }
        .is_empty());
        assert!(!no[0].is_empty());
    }
}
