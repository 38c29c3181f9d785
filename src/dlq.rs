//! Dead-letter triage, shared by `courier dlq` and the admin port's `/dlq` API: filters, the
//! walk through the dead-letter list in pages of bounded size, stats grouped by cause, and
//! requeue and purge of what a filter selects, one record at a time.
//!
//! **Positions.** Records are addressed by their position counted from the tail of the list
//! (1 = the oldest). Workers LPUSH new dead letters at the head, which leaves these positions
//! unchanged, so a walk (or a cursor held by a browser) is not disturbed by them. A requeue or
//! purge does not remove a record where it stands: it sets a tombstone in its place (same
//! position for everything else), and an `LREM` from the tail takes the tombstones out every
//! `SWEEP_EVERY` records and at the end.
//!
//! **Memory.** Each page is read by one script that stops at `PAGE_BYTES` of records (at least
//! one record), reads huge records one at a time, and returns records cut to `PREVIEW_BYTES`
//! when the whole is not needed (listing, stats). Only requeue reads whole records, a page at
//! a time, because the message that goes back is made from the whole record.
//!
//! **Kill safety.** Each record is moved by one script that checks the record at the position
//! is still the one read (by SHA-1), copies the message to the queue, then sets the tombstone.
//! Stopped at any point it leaves the record in the dead list, in the queue, or (stopped between
//! the copy and the tombstone: a denied LSET, OOM, a failover) in both: run again, it is
//! requeued a second time. Killing the process between scripts loses nothing and doubles
//! nothing: a moved record is no longer in the dead list; a tombstone left behind is skipped by
//! every reader and swept by the next requeue or purge.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::{engine::general_purpose::STANDARD as BASE64, Engine};
use chrono::{DateTime, Utc};

use crate::message::{parse_dead_letter, DeadRecord, Envelope};
use crate::queue::{self, Conn, DeadPage, Keys, PageRequest, QueueError};

/// The most bytes of records one page script reads (a single larger record is read alone).
pub const PAGE_BYTES: u64 = 4 << 20;
/// The most records one page script reads.
pub const PAGE_RECORDS: u64 = 2000;
/// Listing and stats read at most this much of each record: the header and the start of the
/// message.
pub const PREVIEW_BYTES: u64 = 64 << 10;
/// Tombstones are swept after this many requeues or deletions (and at the end). Each sweep is
/// one `LREM` from the tail as deep as the walk has gone.
pub const SWEEP_EVERY: u64 = 2000;

/// Which dead letters a command acts on. Empty: all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
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
    pub fn is_empty(&self) -> bool {
        self.reason.is_empty()
            && self.status.is_empty()
            && self.since.is_none()
            && self.until.is_none()
            && self.grep.as_deref().is_none_or(str::is_empty)
            && self.ids.is_empty()
    }

    fn grep_text(&self) -> &str {
        self.grep.as_deref().unwrap_or("")
    }

    /// Whether a letter passes every condition (the grep was checked in Redis: `hit`).
    pub fn matches(&self, letter: &Letter, hit: bool) -> bool {
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
            if self.since.is_some_and(|since| at < since) || self.until.is_some_and(|until| at >= until) {
                return false;
            }
        }
        if !self.ids.is_empty() && !letter.message_id().is_some_and(|id| self.ids.iter().any(|w| w == id)) {
            return false;
        }
        true
    }
}

/// A filter as text, the way the HTTP API (query parameters or a JSON body) and the page send
/// it: lists comma-separated or as arrays, times as RFC 3339 or durations.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilterText {
    pub reason: Option<String>,
    pub status: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub grep: Option<String>,
    pub ids: Vec<String>,
}

impl FilterText {
    /// The filter, or what is wrong with it (naming the field).
    pub fn parse(&self, now: DateTime<Utc>) -> Result<Filter, String> {
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
pub fn parse_time_bound(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    let bad = || {
        format!("{text:?} is neither an RFC 3339 time (2025-01-15T10:00:00Z) nor a duration such as 90s, 30m, 2h or 7d")
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

/// One dead letter as read: where it is, its header fields and (the start of) its message.
#[derive(Debug, Clone)]
pub struct Letter {
    /// Its position from the tail when read: the cursor of one letter.
    pub position: u64,
    /// The whole record's size in bytes.
    pub size: u64,
    /// The record's SHA-1, when read for a move.
    pub sha: String,
    /// The record (or its first `PREVIEW_BYTES`).
    pub record: Vec<u8>,
    /// Whether `record` is only the start.
    pub truncated: bool,
    /// `reason`, `error`, `dead_at`, `message_id`, ... (`Null`: not a record courier wrote).
    pub fields: serde_json::Value,
    /// The original item (or its start).
    pub message: Vec<u8>,
}

impl Letter {
    fn read(slot: queue::DeadSlot) -> Letter {
        let DeadRecord { fields, message } = parse_dead_letter(&slot.bytes);
        Letter {
            position: slot.position,
            truncated: slot.size > u64::try_from(slot.bytes.len()).unwrap_or(u64::MAX),
            size: slot.size,
            sha: slot.sha,
            record: slot.bytes,
            fields,
            message,
        }
    }

    pub fn reason(&self) -> &str {
        self.fields["reason"].as_str().unwrap_or("unknown")
    }

    pub fn error(&self) -> &str {
        self.fields["error"].as_str().unwrap_or("")
    }

    pub fn message_id(&self) -> Option<&str> {
        self.fields["message_id"].as_str()
    }

    /// The HTTP status of the main server's answer: the record's `status`, or the one its
    /// error names (`main server answered HTTP 422: ...`).
    pub fn status(&self) -> Option<u16> {
        if let Some(status) = self.fields["status"].as_u64() {
            return u16::try_from(status).ok();
        }
        let error = self.error();
        let at = error.find("answered HTTP ")? + "answered HTTP ".len();
        let digits: String = error[at..].chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok().filter(|s| (100..=999).contains(s))
    }

    pub fn dead_at(&self) -> Option<DateTime<Utc>> {
        let text = self.fields["dead_at"].as_str()?;
        DateTime::parse_from_rfc3339(text).ok().map(|t| t.with_timezone(&Utc))
    }

    /// As one JSON object: the header fields, the message (`message`, or `message_base64`
    /// when not UTF-8; cut at `PREVIEW_BYTES` when `truncated`), `position`, `size`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut json = match &self.fields {
            serde_json::Value::Object(fields) => serde_json::Value::Object(fields.clone()),
            _ => serde_json::json!({}),
        };
        match std::str::from_utf8(&self.message) {
            Ok(text) => json["message"] = text.into(),
            // A cut may split a character: show the valid part.
            Err(e) if self.truncated && e.error_len().is_none() => {
                json["message"] = String::from_utf8_lossy(&self.message[..e.valid_up_to()]).into();
            }
            Err(_) => json["message_base64"] = BASE64.encode(&self.message).into(),
        }
        json["position"] = self.position.into();
        json["size"] = self.size.into();
        json["truncated"] = self.truncated.into();
        if let Some(status) = self.status() {
            json["status"] = status.into();
        }
        json
    }

    /// The message as it goes back to the queue: `attempt_count` reset to 0 when it is a valid
    /// message that has failed attempts, otherwise the original bytes unchanged. Needs the
    /// whole record.
    pub fn requeued(&self) -> Vec<u8> {
        match Envelope::parse(self.message.clone(), usize::MAX) {
            Ok(envelope) if envelope.attempt_count() > 0 => envelope.with_attempt_count(0),
            _ => self.message.clone(),
        }
    }
}

/// A page of letters that match a filter, newest first, and where the next page starts.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub letters: Vec<Letter>,
    /// The position to pass as `from` for the next page; `None`: no more.
    pub next: Option<u64>,
    /// Dead letters in the list (LLEN when first read).
    pub total: u64,
}

/// Up to `limit` letters matching `filter`, newest first, starting at position `from` (None:
/// the newest). Reads pages of records cut to `PREVIEW_BYTES` until it has `limit` or has read
/// `scan_budget` records (a cursor to go on from is returned either way).
pub async fn list(
    conn: &mut Conn,
    keys: &Keys,
    filter: &Filter,
    from: Option<u64>,
    limit: usize,
    scan_budget: u64,
) -> Result<Listing, QueueError> {
    let mut listing = Listing::default();
    let mut at = from.unwrap_or(0);
    let mut chunk = 1;
    let mut scanned = 0u64;
    let mut first = true;
    loop {
        if !first && at == 0 {
            return Ok(listing);
        }
        let want = u64::try_from(limit.saturating_sub(listing.letters.len())).unwrap_or(u64::MAX);
        let page = queue::dead_page(
            conn,
            keys,
            &PageRequest {
                from: at,
                newer: false,
                // While nothing is filtered, read no more than is shown.
                max_records: if filter.is_empty() {
                    want.clamp(1, PAGE_RECORDS)
                } else {
                    PAGE_RECORDS
                },
                max_bytes: PAGE_BYTES,
                chunk,
                cap: PREVIEW_BYTES,
                grep: filter.grep_text(),
                sha: false,
                header_only: false,
            },
        )
        .await?;
        if first {
            listing.total = page.len;
            first = false;
        }
        scanned = scanned.saturating_add(u64::try_from(page.slots.len()).unwrap_or(0) + page.tombstones + page.misses);
        chunk = page.chunk;
        for slot in page.slots {
            let position = slot.position;
            let hit = slot.hit;
            let letter = Letter::read(slot);
            if filter.matches(&letter, hit) {
                listing.letters.push(letter);
                if listing.letters.len() >= limit {
                    listing.next = position.checked_sub(1).filter(|p| *p > 0);
                    return Ok(listing);
                }
            }
        }
        at = page.next;
        listing.next = Some(at).filter(|p| *p > 0);
        if at == 0 || scanned >= scan_budget {
            return Ok(listing);
        }
    }
}

/// The whole record of a letter `list` returned cut (or `None` when it was whole already,
/// or is no longer at its position).
pub async fn whole(conn: &mut Conn, keys: &Keys, letter: &Letter) -> Result<Option<Letter>, QueueError> {
    if !letter.truncated {
        return Ok(None);
    }
    let page = queue::dead_page(
        conn,
        keys,
        &PageRequest {
            from: letter.position,
            newer: true,
            max_records: 1,
            max_bytes: 1,
            chunk: 1,
            cap: 0,
            grep: "",
            sha: false,
            header_only: false,
        },
    )
    .await?;
    Ok(page
        .slots
        .into_iter()
        .next()
        .filter(|slot| slot.bytes.starts_with(&letter.record))
        .map(Letter::read))
}

/// The dead letter at `position`, cut to `cap` bytes, or `None` when there is none (or a
/// tombstone) there now.
pub async fn at(conn: &mut Conn, keys: &Keys, position: u64, cap: u64) -> Result<Option<Letter>, QueueError> {
    if position == 0 {
        return Ok(None);
    }
    let page = queue::dead_page(
        conn,
        keys,
        &PageRequest {
            from: position,
            newer: true,
            max_records: 1,
            max_bytes: 1,
            chunk: 1,
            cap,
            grep: "",
            sha: false,
            header_only: false,
        },
    )
    .await?;
    Ok(page.slots.into_iter().next().map(Letter::read))
}

/// Dead letters by reason among the newest `newest`, read in pages of headers (what
/// `courier stats` shows: bounded work however long the list is).
pub async fn reasons(conn: &mut Conn, keys: &Keys, newest: u64) -> Result<BTreeMap<String, u64>, QueueError> {
    let mut by_reason = BTreeMap::new();
    let (mut at, mut chunk, mut read) = (0u64, 1u64, 0u64);
    loop {
        let page = queue::dead_page(
            conn,
            keys,
            &PageRequest {
                from: at,
                newer: false,
                max_records: PAGE_RECORDS.min(newest.saturating_sub(read)).max(1),
                max_bytes: PAGE_BYTES,
                chunk,
                cap: 4096,
                grep: "",
                sha: false,
                header_only: true,
            },
        )
        .await?;
        read = read.saturating_add(u64::try_from(page.slots.len()).unwrap_or(0) + page.tombstones);
        for slot in page.slots {
            *by_reason.entry(Letter::read(slot).reason().to_string()).or_insert(0) += 1;
        }
        if page.next == 0 || read >= newest {
            return Ok(by_reason);
        }
        (at, chunk) = (page.next, page.chunk);
    }
}

/// Walks every dead letter, oldest first, calling `each` with the letters of each page, cut
/// to `cap` bytes (0: whole) and with their SHA-1 when `sha`. `each` returns how many of the
/// page it replaced with tombstones; the walk sweeps them every `SWEEP_EVERY` and at the end,
/// and continues at the right place. Returns the records read.
async fn walk<F>(
    conn: &mut Conn,
    keys: &Keys,
    grep: &str,
    cap: u64,
    sha: bool,
    header_only: bool,
    mut each: F,
) -> Result<u64, QueueError>
where
    F: AsyncPageFn,
{
    let mut at = 1u64;
    let mut chunk = 1;
    let mut pending = 0u64;
    let mut read = 0u64;
    loop {
        let page: DeadPage = queue::dead_page(
            conn,
            keys,
            &PageRequest {
                from: at,
                newer: true,
                max_records: PAGE_RECORDS,
                max_bytes: PAGE_BYTES,
                chunk,
                cap,
                grep,
                sha,
                header_only,
            },
        )
        .await?;
        chunk = page.chunk;
        read = read.saturating_add(u64::try_from(page.slots.len()).unwrap_or(0) + page.misses);
        // Tombstones a killed run left behind are swept with ours.
        pending = pending.saturating_add(page.tombstones);
        let letters: Vec<(Letter, bool)> = page
            .slots
            .into_iter()
            .map(|slot| {
                let hit = slot.hit;
                (Letter::read(slot), hit)
            })
            .collect();
        let (replaced, stop) = each.call(conn, keys, letters).await?;
        pending = pending.saturating_add(replaced);
        let done = stop || page.next == 0 || page.next > page.len;
        at = page.next;
        if pending >= SWEEP_EVERY || (done && pending > 0) {
            // Every tombstone is below `at`: the walk put them there.
            let removed = queue::sweep_dead(conn, keys, pending).await?;
            at = at.saturating_sub(removed).max(1);
            pending = pending.saturating_sub(removed);
        }
        if done {
            return Ok(read);
        }
    }
}

/// What `walk` calls with each page (a trait, as async closures borrowing the connection are
/// awkward): returns how many records it replaced with tombstones, and whether to stop.
trait AsyncPageFn {
    async fn call(
        &mut self,
        conn: &mut Conn,
        keys: &Keys,
        page: Vec<(Letter, bool)>,
    ) -> Result<(u64, bool), QueueError>;
}

/// Dead letters grouped by cause: reason, status and the error with its ids, numbers and
/// times folded.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Stats {
    pub total: u64,
    pub groups: Vec<Group>,
}

#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct Group {
    pub reason: String,
    pub status: Option<u16>,
    /// The error with ids, numbers and times folded (`N`, `<id>`).
    pub error: String,
    pub count: u64,
    pub oldest: Option<String>,
    pub newest: Option<String>,
}

/// The most groups kept: past it, further causes count in one `(other)` group, so stats of a
/// list of wildly different errors stay bounded too.
const MAX_GROUPS: usize = 1000;

/// The error text with what varies between instances of one cause folded: runs of digits
/// become `N`, long hexadecimal or id-like words `<id>`; cut at 200 characters.
pub fn fold_error(error: &str) -> String {
    let mut out = String::new();
    for word in error.split_inclusive(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ',' | '/' | '=' | ':')) {
        let (body, tail) = match word.char_indices().last() {
            Some((i, c)) if c.is_whitespace() || matches!(c, '"' | '\'' | ',' | '/' | '=' | ':') => word.split_at(i),
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
            if self.groups.len() >= MAX_GROUPS && !self.groups.contains_key(&(reason.clone(), status, error.clone())) {
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
            if let Some(at) = letter.fields["dead_at"].as_str() {
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
pub async fn stats(conn: &mut Conn, keys: &Keys, filter: &Filter) -> Result<Stats, QueueError> {
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

impl<T: AsyncPageFn> AsyncPageFn for &mut T {
    async fn call(
        &mut self,
        conn: &mut Conn,
        keys: &Keys,
        page: Vec<(Letter, bool)>,
    ) -> Result<(u64, bool), QueueError> {
        (**self).call(conn, keys, page).await
    }
}

/// What a requeue or purge does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Back to the queue: to its front (delivered next) or back.
    Requeue {
        front: bool,
    },
    Purge,
}

/// How a requeue or purge runs.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Only count what would be acted on.
    pub dry_run: bool,
    /// At most this many.
    pub limit: Option<u64>,
    /// At most this many per second.
    pub rate: Option<f64>,
}

/// What a requeue or purge did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Outcome {
    /// Records read.
    pub scanned: u64,
    /// Records the filter selected (with `dry_run`: what would move).
    pub matched: u64,
    /// Records moved (or deleted).
    pub done: u64,
    /// Selected records another client moved or removed first.
    pub changed: u64,
    /// The message ids acted on (or that would be), at most `MAX_IDS`.
    pub ids: Vec<String>,
}

/// The most ids an `Outcome` lists.
const MAX_IDS: usize = 1000;

struct MovePage<'a, P> {
    filter: &'a Filter,
    action: Action,
    options: &'a Options,
    outcome: Outcome,
    progress: P,
    started: std::time::Instant,
}

impl<P: FnMut(&Outcome)> AsyncPageFn for MovePage<'_, P> {
    async fn call(
        &mut self,
        conn: &mut Conn,
        keys: &Keys,
        page: Vec<(Letter, bool)>,
    ) -> Result<(u64, bool), QueueError> {
        let mut replaced = 0;
        self.outcome.scanned += u64::try_from(page.len()).unwrap_or(0);
        for (letter, hit) in page {
            if self.options.limit.is_some_and(|limit| self.outcome.matched >= limit) {
                return Ok((replaced, true));
            }
            if !self.filter.matches(&letter, hit) {
                continue;
            }
            self.outcome.matched += 1;
            if self.outcome.ids.len() < MAX_IDS {
                if let Some(id) = letter.message_id() {
                    self.outcome.ids.push(id.to_string());
                }
            }
            if self.options.dry_run {
                continue;
            }
            if let Some(rate) = self.options.rate.filter(|r| *r > 0.0) {
                // The n-th move waits until n / rate seconds after the start.
                #[allow(clippy::cast_precision_loss)]
                let due = Duration::try_from_secs_f64(self.outcome.done as f64 / rate).unwrap_or(Duration::MAX);
                if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            let moved = match self.action {
                Action::Requeue { front } => {
                    queue::requeue_dead_at(conn, keys, letter.position, &letter.sha, &letter.requeued(), front).await?
                }
                Action::Purge => queue::drop_dead_at(conn, keys, letter.position, &letter.sha).await?,
            };
            if moved {
                self.outcome.done += 1;
                replaced += 1;
            } else {
                self.outcome.changed += 1;
            }
            if self.outcome.done % 500 == 0 {
                (self.progress)(&self.outcome);
            }
        }
        (self.progress)(&self.outcome);
        Ok((replaced, false))
    }
}

/// Requeues or purges the dead letters `filter` selects, oldest first (so requeued messages
/// keep their order), one script each. `progress` hears how far it got now and then.
pub async fn act(
    conn: &mut Conn,
    keys: &Keys,
    filter: &Filter,
    action: Action,
    options: &Options,
    progress: impl FnMut(&Outcome),
) -> Result<Outcome, QueueError> {
    let mut page = MovePage {
        filter,
        action,
        options,
        outcome: Outcome::default(),
        progress,
        started: std::time::Instant::now(),
    };
    // Requeue makes the message from the whole record; purge needs only the header.
    let cap = match action {
        Action::Requeue { .. } if !options.dry_run => 0,
        _ => 4096,
    };
    let header_only = cap != 0;
    walk(
        conn,
        keys,
        filter.grep_text(),
        cap,
        !options.dry_run,
        header_only,
        &mut page,
    )
    .await?;
    Ok(page.outcome)
}

/// Deletes the whole dead-letter list; returns how many records it held.
pub async fn purge_all(conn: &mut Conn, keys: &Keys) -> Result<u64, QueueError> {
    queue::purge_dead(conn, keys).await
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn errors_of_one_cause_fold_to_one_text() {
        let a = fold_error("main server answered HTTP 422: order 8f3a9c1e-77aa-4b2c rejected at 2025-01-15T10:00:01Z");
        let b = fold_error("main server answered HTTP 422: order 1b2c3d4e-0000-4fff rejected at 2025-02-01T23:59:59Z");
        assert_eq!(a, b);
        assert!(a.starts_with("main server answered HTTP N: order <id> rejected"), "{a}");
        assert_ne!(a, fold_error("main server answered HTTP 422: order x rejected"));
        assert!(fold_error(&"é".repeat(500)).chars().count() <= 200);
    }

    #[test]
    fn the_status_comes_from_the_field_or_the_error() {
        let letter = |header: &str| {
            Letter::read(queue::DeadSlot {
                position: 1,
                size: 0,
                bytes: format!("{header}\n{{}}").into_bytes(),
                hit: true,
                sha: String::new(),
            })
        };
        assert_eq!(
            letter(r#"{"reason":"rejected","error":"main server answered HTTP 422: no"}"#).status(),
            Some(422)
        );
        assert_eq!(
            letter(r#"{"reason":"rejected","status":409,"error":"x"}"#).status(),
            Some(409)
        );
        assert_eq!(
            letter(r#"{"reason":"exhausted","error":"answered HTTP 99999999999"}"#).status(),
            None
        );
        assert_eq!(letter(r#"{"reason":"exhausted","error":"timeout"}"#).status(), None);
    }

    #[test]
    fn filters_combine_every_condition() {
        let letter = Letter::read(queue::DeadSlot {
            position: 1,
            size: 0,
            bytes: br#"{"reason":"rejected","error":"main server answered HTTP 422: no","dead_at":"2025-01-15T10:00:00.000Z","message_id":"m-1"}
{"message_id":"m-1"}"#
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
