//! Dead letters grouped by cause: reason, status and the error with what varies between
//! instances of one cause folded.

use std::collections::BTreeMap;

use super::pages::{walk, AsyncPageFn};
use super::{Filter, Letter};
use crate::queue::{Conn, Keys, QueueError};

/// Dead letters grouped by cause: reason, status and the error with its ids, numbers and
/// times folded.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct Stats {
    /// The dead letters that matched.
    pub total: u64,
    /// Their causes, largest group first.
    pub groups: Vec<Group>,
}

/// The dead letters of one cause.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub(crate) struct Group {
    /// Their reason (`rejected`, `exhausted`, ...).
    pub reason: String,
    /// The main server's HTTP status, when it answered.
    pub status: Option<u16>,
    /// The error with ids, numbers and times folded (`N`, `<id>`).
    pub error: String,
    /// How many.
    pub count: u64,
    /// The oldest one's `dead_at`.
    pub oldest: Option<String>,
    /// The newest one's `dead_at`.
    pub newest: Option<String>,
}

/// The most groups kept: past it, further causes count in one `(other)` group, so stats of a
/// list of wildly different errors stay bounded too.
const MAX_GROUPS: usize = 1000;

/// The error text with what varies between instances of one cause folded: runs of digits
/// become `N`, long hexadecimal or id-like words `<id>`; cut at 200 characters.
pub(crate) fn fold_error(error: &str) -> String {
    let mut out = String::new();
    let separator = |c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ',' | '/' | '=' | ':');
    for word in error.split_inclusive(separator) {
        let (body, tail) = match word.char_indices().last() {
            Some((i, c)) if separator(c) => word.split_at(i),
            _ => (word, ""),
        };
        let digits = body.chars().filter(char::is_ascii_digit).count();
        let idlike = body.len() >= 8
            && digits > 0
            && body.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && body.chars().any(|c| c.is_ascii_alphabetic());
        if idlike {
            out.push_str("<id>");
        } else {
            let mut last_digit = false;
            for c in body.chars() {
                if c.is_ascii_digit() {
                    if !last_digit {
                        out.push('N');
                    }
                    last_digit = true;
                } else {
                    last_digit = false;
                    out.push(c);
                }
            }
        }
        out.push_str(tail);
        if out.chars().count() > 200 {
            return out.chars().take(200).collect();
        }
    }
    out
}

struct StatsPage<'a> {
    filter: &'a Filter,
    groups: BTreeMap<(String, Option<u16>, String), Group>,
    total: u64,
}

impl AsyncPageFn for StatsPage<'_> {
    async fn call(&mut self, _: &mut Conn, _: &Keys, page: Vec<(Letter, bool)>) -> Result<(u64, bool), QueueError> {
        for (letter, hit) in page {
            if !self.filter.matches(&letter, hit) {
                continue;
            }
            self.total += 1;
            let (reason, status) = (letter.reason().to_string(), letter.status());
            let mut error = fold_error(letter.error());
            let full = self.groups.len() >= MAX_GROUPS;
            if full && !self.groups.contains_key(&(reason.clone(), status, error.clone())) {
                error = "(other)".into();
            }
            let key = (reason.clone(), status, error.clone());
            let group = self.groups.entry(key).or_insert_with(|| Group {
                reason,
                status,
                error,
                count: 0,
                oldest: None,
                newest: None,
            });
            group.count += 1;
            if let Some(at) = letter.header.dead_at.as_deref() {
                // RFC 3339 in UTC with the same precision, as courier writes them, sort as text.
                if group.oldest.as_deref().is_none_or(|o| at < o) {
                    group.oldest = Some(at.to_string());
                }
                if group.newest.as_deref().is_none_or(|n| at > n) {
                    group.newest = Some(at.to_string());
                }
            }
        }
        Ok((0, false))
    }
}

/// Dead letters matching `filter`, grouped by cause, largest group first.
pub(crate) async fn stats(conn: &mut Conn, keys: &Keys, filter: &Filter) -> Result<Stats, QueueError> {
    let mut page = StatsPage {
        filter,
        groups: BTreeMap::new(),
        total: 0,
    };
    // The header is at the start of each record: a short preview is enough.
    walk(conn, keys, filter.grep_text(), 4096, false, true, &mut page).await?;
    let mut groups: Vec<Group> = page.groups.into_values().collect();
    groups.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.reason.cmp(&b.reason)));
    Ok(Stats {
        total: page.total,
        groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_of_one_cause_fold_to_one_text() {
        let a = fold_error(
            "main server answered HTTP 422: order 8f3a9c1e-77aa-4b2c rejected at \
             2025-01-15T10:00:01Z",
        );
        let b = fold_error(
            "main server answered HTTP 422: order 1b2c3d4e-0000-4fff rejected at \
             2025-02-01T23:59:59Z",
        );
        assert_eq!(a, b);
        assert!(a.starts_with("main server answered HTTP N: order <id> rejected"), "{a}");
        assert_ne!(a, fold_error("main server answered HTTP 422: order x rejected"));
        assert!(fold_error(&"é".repeat(500)).chars().count() <= 200);
    }
}
