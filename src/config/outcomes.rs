//! `main_server.outcomes` (MAIN_SERVER_OUTCOMES): the statuses whose meaning the operator sets
//! over the default table, which `policy` applies.

/// What an HTTP status means for the message, as the operator may set it
/// (`MAIN_SERVER_OUTCOMES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusOutcome {
    /// The server has the message: acknowledged.
    Delivered,
    /// Tried again later.
    Retry,
    /// Dead-lettered at once.
    Reject,
}

impl StatusOutcome {
    fn parse(text: &str) -> Option<StatusOutcome> {
        match text.trim().to_ascii_lowercase().as_str() {
            "delivered" => Some(StatusOutcome::Delivered),
            "retry" => Some(StatusOutcome::Retry),
            "reject" | "rejected" => Some(StatusOutcome::Reject),
            _ => None,
        }
    }
}

/// Statuses whose outcome the operator set (`MAIN_SERVER_OUTCOMES`), over the default table
/// (`policy::Outcomes` reads them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutcomeRules {
    /// Inclusive ranges, in the order given; the first that holds a status decides.
    pub rules: Vec<(u16, u16, StatusOutcome)>,
}

impl OutcomeRules {
    /// Reads `409=delivered,404=retry,500-599=reject`: comma-separated `STATUS=OUTCOME` or
    /// `FIRST-LAST=OUTCOME`, statuses 100 to 599 outside 2xx (a 2xx is always delivered: the
    /// server has the message), outcomes `delivered`, `retry` or `reject`. Earlier entries win
    /// where ranges overlap. Returns what is wrong, to be named with the setting.
    pub fn parse(text: &str) -> Result<OutcomeRules, String> {
        let mut rules = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let Some((statuses, kind)) = entry.split_once('=') else {
                return Err(format!(
                    "{entry:?} has no '=': expected STATUS=OUTCOME such as 409=delivered"
                ));
            };
            let kind = StatusOutcome::parse(kind)
                .ok_or_else(|| format!("{entry:?}: the outcome must be delivered, retry or reject"))?;
            let status = |text: &str| {
                text.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|s| (100..=599).contains(s))
                    .ok_or_else(|| format!("{entry:?}: {:?} is not an HTTP status from 100 to 599", text.trim()))
            };
            let (first, last) = match statuses.split_once('-') {
                Some((first, last)) => (status(first)?, status(last)?),
                None => {
                    let one = status(statuses)?;
                    (one, one)
                }
            };
            if first > last {
                return Err(format!("{entry:?}: the range runs backwards"));
            }
            if first <= 299 && last >= 200 {
                return Err(format!(
                    "{entry:?}: a 2xx is always delivered (the main server has the message)"
                ));
            }
            if kind == StatusOutcome::Delivered && !(first >= 400 && last <= 499) {
                return Err(format!(
                    "{entry:?}: only a 4xx can count as delivered (a 1xx, 3xx or 5xx means \
                     the main server does not have the message; it would be lost)"
                ));
            }
            let hidden = (first..=last).all(|s| rules.iter().any(|(f, l, _)| (*f..=*l).contains(&s)));
            if hidden {
                return Err(format!(
                    "{entry:?}: an earlier entry already sets every status it names"
                ));
            }
            rules.push((first, last, kind));
        }
        Ok(OutcomeRules { rules })
    }
}
