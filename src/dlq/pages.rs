//! The walks through the dead-letter list, one page script a step: newest first for a listing
//! (from a cursor) and for `courier stats`, oldest first for stats and moves (`walk`, which
//! sweeps the tombstones a move leaves), and the read of a single letter.

use std::collections::BTreeMap;

use super::{Filter, Letter, PAGE_BYTES, PAGE_RECORDS, PREVIEW_BYTES, SWEEP_EVERY};
use crate::queue::{self, Conn, DeadPage, DeadSlot, Keys, PageRequest, QueueError};

/// A page of letters that match a filter, newest first, and where the next page starts.
#[derive(Debug, Clone, Default)]
pub(crate) struct Listing {
    /// The letters, newest first.
    pub letters: Vec<Letter>,
    /// The position to pass as `from` for the next page; `None`: no more.
    pub next: Option<u64>,
    /// Dead letters in the list (LLEN when first read).
    pub total: u64,
}

/// Up to `limit` letters matching `filter`, newest first, starting at position `from` (None:
/// the newest). Reads pages of records cut to `PREVIEW_BYTES` until it has `limit` or has read
/// `scan_budget` records (a cursor to go on from is returned either way).
pub(crate) async fn list(
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
        let missing = limit.saturating_sub(listing.letters.len());
        let want = u64::try_from(missing).unwrap_or(u64::MAX);
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
        let passed = u64::try_from(page.slots.len()).unwrap_or(0) + page.tombstones + page.misses;
        scanned = scanned.saturating_add(passed);
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
pub(crate) async fn whole(conn: &mut Conn, keys: &Keys, letter: &Letter) -> Result<Option<Letter>, QueueError> {
    if !letter.truncated {
        return Ok(None);
    }
    let slot = read_one(conn, keys, letter.position, 0).await?;
    Ok(slot
        .filter(|slot| slot.bytes.starts_with(&letter.record))
        .map(Letter::read))
}

/// The dead letter at `position`, cut to `cap` bytes, or `None` when there is none (or a
/// tombstone) there now.
pub(crate) async fn at(conn: &mut Conn, keys: &Keys, position: u64, cap: u64) -> Result<Option<Letter>, QueueError> {
    if position == 0 {
        return Ok(None);
    }
    Ok(read_one(conn, keys, position, cap).await?.map(Letter::read))
}

/// The record at `position` read alone, cut to `cap` bytes (0: whole); `None` when there is
/// none (or a tombstone) there now.
async fn read_one(conn: &mut Conn, keys: &Keys, position: u64, cap: u64) -> Result<Option<DeadSlot>, QueueError> {
    let request = PageRequest {
        from: position,
        newer: true,
        max_records: 1,
        max_bytes: 1,
        chunk: 1,
        cap,
        grep: "",
        sha: false,
        header_only: false,
    };
    let page = queue::dead_page(conn, keys, &request).await?;
    Ok(page.slots.into_iter().next())
}

/// Dead letters by reason among the newest `newest`, read in pages of headers (what
/// `courier stats` shows: bounded work however long the list is).
pub(crate) async fn reasons(conn: &mut Conn, keys: &Keys, newest: u64) -> Result<BTreeMap<String, u64>, QueueError> {
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
pub(super) async fn walk<F>(
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
pub(super) trait AsyncPageFn {
    async fn call(
        &mut self,
        conn: &mut Conn,
        keys: &Keys,
        page: Vec<(Letter, bool)>,
    ) -> Result<(u64, bool), QueueError>;
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
