//! The Lua scripts: each one move of messages between keys of one queue, declaring every key it
//! touches (so each runs in one cluster slot), and safe to run twice.
//!
//! **Copy before remove.** Redis runs a script without interruption but does not undo its
//! earlier writes when a later command fails (a command the ACL denies, WRONGTYPE, OOM,
//! READONLY). So every script that moves an item reads it where it is (LRANGE, LPOS,
//! ZRANGEBYSCORE), writes it to its destination, and removes it from its source last: stopped
//! at any command, it leaves the item in at least one place. A duplicate is possible; absence
//! is not. `tests/it/scripts.rs` denies each command of each script in turn and checks this.
//!
//! **Queue time.** Due times of retries are in the queue's own clock (`Q:clock`): Redis `TIME`
//! plus an offset that grows whenever `TIME` is seen to step back, so the clock of the queue
//! never runs backwards and a retry is not held for the length of a step back.

use redis::Script;

use crate::message::{claim_headers, ClaimHeaders};

/// Lua: `redis_ms()`, Redis `TIME` in ms since the epoch. A macro, so that `NOW_MS` and
/// `QUEUE_NOW` (which builds on it) are one text spliced with `concat!`.
macro_rules! redis_ms {
    () => {
        r"
local function redis_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"
    };
}

/// `redis_ms()`, for the scripts that stamp a time (`register`, `heartbeat`).
const NOW_MS: &str = redis_ms!();

/// The queue's clock, for scripts that take `clock` (the `Q:clock` hash) as a key: Redis TIME
/// in ms, plus `offset`; when that is behind `last` (the furthest the clock has read, written
/// at most once a second), TIME stepped back, and `offset` grows by the step.
const QUEUE_NOW: &str = concat!(
    redis_ms!(),
    r"
local function queue_now(clock)
  local time = redis_ms()
  local c = redis.call('HMGET', clock, 'offset', 'last')
  local offset, last = tonumber(c[1]) or 0, tonumber(c[2]) or 0
  local now = time + offset
  if now < last then
    redis.call('HSET', clock, 'offset', offset + last - now)
    return last
  end
  if now > last + 1000 then redis.call('HSET', clock, 'last', now) end
  return now
end
"
);

/// The message id of a queue item, for the dead-letter records the claim script writes, so
/// that `dlq show ID` finds them: `message_id(item, true)` decodes the item (one within the
/// size limit); `message_id(item, false)` (an item over it, which may be huge) looks for a
/// `"message_id":"..."` without escapes in its first 64 KiB. '' when there is none.
/// `id_field(id)` is `,"message_id":"..."` or '' for the record's header.
const MESSAGE_ID: &str = r#"
local function message_id(item, decode)
  if decode then
    local ok, value = pcall(cjson.decode, item)
    if ok and type(value) == 'table' and type(value['message_id']) == 'string' then
      return value['message_id']
    end
    return ''
  end
  return string.match(string.sub(item, 1, 65536), '"message_id"%s*:%s*"([^"\\%c]*)"') or ''
end
local function id_field(id)
  if id == '' then return '' end
  return ',"message_id":' .. cjson.encode(id)
end
"#;

/// Fills the `$name$` holes of a dead letter's header that the worker wrote for the claim
/// script (`message::claim_headers`) with `values`, a table by name: what only the script
/// knows. One pass, so a value is never read for holes itself.
const FILL: &str = r"
local function fill(header, values)
  return (string.gsub(header, '%$(%a+)%$', values))
end
";

/// Counts one more reclaim of `item` in the hash `reclaims`, unless the hash already holds
/// `cap` other items (it stays bounded; such an item is then not counted).
const COUNT_RECLAIM: &str = r"
local function count_reclaim(reclaims, item, cap)
  local sha = redis.sha1hex(item)
  if redis.call('HLEN', reclaims) < cap or redis.call('HEXISTS', reclaims, sha) == 1 then
    redis.call('HINCRBY', reclaims, sha, 1)
  end
end
";

/// The most items the reclaim counts hold: past it, items not yet counted are not counted.
pub(super) const MAX_RECLAIM_ENTRIES: u32 = 100_000;

/// Lua scripts, loaded once and run by hash.
pub(super) struct Scripts {
    pub(super) claim: Script,
    pub(super) retry: Script,
    pub(super) dead: Script,
    pub(super) release: Script,
    pub(super) rotate: Script,
    pub(super) promote: Script,
    pub(super) give_back: Script,
    pub(super) return_strays: Script,
    pub(super) forget_reclaims: Script,
    pub(super) register: Script,
    pub(super) heartbeat: Script,
    pub(super) reap: Script,
    pub(super) deregister: Script,
}

/// Moves one item ARGV[1] from the list KEYS[1] to KEYS[2]: checks that it is there (LPOS from
/// the tail, where the oldest claims are), runs `write` (which copies it to its destination),
/// then removes it. Returns 0 when it was not there (already moved: running it twice does
/// nothing the second time), 1 when moved.
fn move_one(write: &str) -> Script {
    Script::new(&format!(
        r"if not redis.call('LPOS', KEYS[1], ARGV[1], 'RANK', -1) then return 0 end
          {write}
          redis.call('LREM', KEYS[1], -1, ARGV[1])
          return 1"
    ))
}

impl Scripts {
    /// Every script, built once per queue handle (loaded into Redis on first use).
    pub(super) fn new() -> Scripts {
        let ClaimHeaders { too_large, poisoned } = claim_headers();
        Scripts {
            // Moves up to ARGV[1] messages from the right of the ready list to the processing
            // list. An item over ARGV[2] bytes never travels to the worker: it goes straight to
            // the dead-letter list KEYS[3] as a record (header line, then the item as it is;
            // the header is `message::claim_headers`, its holes filled). So does an item that
            // workers dying while holding it returned to the queue more than ARGV[5] times
            // (counted in KEYS[4] by its SHA-1; 0: never), as `poisoned`: looked up only while
            // that hash exists, so the happy path costs one EXISTS. ARGV[3] is the worker id as
            // a JSON string, ARGV[4] the time for `dead_at`. Copies first (LRANGE, then the
            // pushes), trims the ready list last. Returns {claimed items oldest first, too
            // large, poisoned, the 1-based places among the claimed of those with a reclaim
            // count}.
            claim: Script::new(&format!(
                r#"{MESSAGE_ID}{FILL}
                  local TOO_LARGE, POISONED = [[{too_large}]], [[{poisoned}]]
                  local items = redis.call('LRANGE', KEYS[1], -tonumber(ARGV[1]), -1)
                  if #items == 0 then return {{{{}}, 0, 0, {{}}, {{}}, {{}}}} end
                  local limit = tonumber(ARGV[2])
                  local max_reclaims = tonumber(ARGV[5])
                  local counted = max_reclaims > 0 and redis.call('EXISTS', KEYS[4]) == 1
                  local keep, counts, forget, big, poisoned = {{}}, {{}}, {{}}, 0, 0
                  local big_ids, poisoned_ids = {{}}, {{}}
                  -- LRANGE lists the oldest (the rightmost) last.
                  for i = #items, 1, -1 do
                    local item = items[i]
                    local reclaims, sha = 0, nil
                    if counted then
                      sha = redis.sha1hex(item)
                      reclaims = tonumber(redis.call('HGET', KEYS[4], sha) or '0')
                    end
                    if #item > limit then
                      big = big + 1
                      local id = message_id(item, false)
                      big_ids[#big_ids + 1] = id
                      local header = fill(TOO_LARGE, {{size = #item, limit = ARGV[2],
                        worker = ARGV[3], at = ARGV[4], id = id_field(id)}})
                      redis.call('LPUSH', KEYS[3], header .. '\n' .. item)
                    elseif reclaims > max_reclaims then
                      poisoned = poisoned + 1
                      forget[#forget + 1] = sha
                      local id = message_id(item, true)
                      poisoned_ids[#poisoned_ids + 1] = id
                      local header = fill(POISONED, {{reclaims = reclaims, max = ARGV[5],
                        worker = ARGV[3], at = ARGV[4], id = id_field(id), size = #item}})
                      redis.call('LPUSH', KEYS[3], header .. '\n' .. item)
                    else
                      keep[#keep + 1] = item
                      if reclaims > 0 then counts[#counts + 1] = #keep end
                    end
                  end
                  if #keep > 0 then redis.call('LPUSH', KEYS[2], unpack(keep)) end
                  redis.call('LTRIM', KEYS[1], 0, -(#items + 1))
                  if #forget > 0 then redis.call('HDEL', KEYS[4], unpack(forget)) end
                  return {{keep, big, poisoned, counts, big_ids, poisoned_ids}}"#
            )),
            // Moves one message ARGV[1] from processing KEYS[1] to the retry set KEYS[2] as
            // ARGV[2], due ARGV[3] ms from now in queue time (KEYS[3]: the clock).
            retry: Script::new(&format!(
                r"{QUEUE_NOW}
                  if not redis.call('LPOS', KEYS[1], ARGV[1], 'RANK', -1) then return 0 end
                  redis.call('ZADD', KEYS[2], queue_now(KEYS[3]) + tonumber(ARGV[3]), ARGV[2])
                  redis.call('LREM', KEYS[1], -1, ARGV[1])
                  return 1"
            )),
            // Moves one message ARGV[1] from processing KEYS[1] to the dead-letter list KEYS[2]
            // as its record ARGV[2].
            dead: move_one("redis.call('LPUSH', KEYS[2], ARGV[2])"),
            // Returns one message ARGV[1] from processing KEYS[1] to the front of the ready
            // list KEYS[2] as it was: no attempt used.
            release: move_one("redis.call('RPUSH', KEYS[2], ARGV[1])"),
            // Returns one message ARGV[1] from processing KEYS[1] to the back of the ready list
            // KEYS[2] as it was: a probe the server failed, so the next probe is another message.
            rotate: move_one("redis.call('LPUSH', KEYS[2], ARGV[1])"),
            // Moves up to ARGV[1] due retries (KEYS[1]) to the front of the ready list KEYS[2]
            // (its right end, where claims take from), the longest due first in line, or up to
            // ARGV[2] when the ready list is empty (no new message waits behind them); returns
            // how many, the ms until the next one is due (-1: none waiting) and whether the list
            // was empty. KEYS[3]: the
            // queue's clock. How many a call moves is the worker's to pace (`promote`).
            promote: Script::new(&format!(
                r"{QUEUE_NOW}
                  local now = queue_now(KEYS[3])
                  local n, filled = tonumber(ARGV[1]), 0
                  if redis.call('LLEN', KEYS[2]) == 0 then
                    n, filled = math.max(n, tonumber(ARGV[2])), 1
                  end
                  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, n)
                  if #due > 0 then
                    local line = {{}}
                    for i = #due, 1, -1 do line[#line + 1] = due[i] end
                    redis.call('RPUSH', KEYS[2], unpack(line))
                    redis.call('ZREM', KEYS[1], unpack(due))
                  end
                  local next = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
                  if #next == 0 then return {{#due, -1, filled}} end
                  return {{#due, math.max(0, tonumber(next[2]) - now), filled}}"
            )),
            // Returns a processing list KEYS[1] to the front of the ready list KEYS[2], oldest
            // claim first in line (LMOVE: each item moves in one command). With ARGV[1] = 1
            // (its worker died holding them) each item's count in KEYS[3] goes up, the hash
            // holding at most ARGV[2] items; the counts expire a week after the last one.
            give_back: Script::new(&format!(
                r"{COUNT_RECLAIM}
                  local n = 0
                  local item = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
                  while item do
                    n = n + 1
                    if ARGV[1] == '1' then count_reclaim(KEYS[3], item, tonumber(ARGV[2])) end
                    item = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
                  end
                  if n > 0 and ARGV[1] == '1' then redis.call('EXPIRE', KEYS[3], 604800) end
                  return n"
            )),
            // Returns each of ARGV (items no task of this worker holds) from processing KEYS[1]
            // to the front of the ready list KEYS[2], one copy each, if it is still there.
            // Returns how many moved.
            return_strays: Script::new(
                r"local n = 0
                  for _, item in ipairs(ARGV) do
                    if redis.call('LPOS', KEYS[1], item, 'RANK', -1) then
                      redis.call('RPUSH', KEYS[2], item)
                      redis.call('LREM', KEYS[1], -1, item)
                      n = n + 1
                    end
                  end
                  return n",
            ),
            // Drops the reclaim count of item ARGV[1] (a worker settled it: it kills no one).
            forget_reclaims: Script::new(r"return redis.call('HDEL', KEYS[1], redis.sha1hex(ARGV[1]))"),
            // Takes worker id ARGV[1] for process ARGV[2], unless another process holds it. A
            // holder is passed over when it is ARGV[3] (known to be dead: its process is gone
            // from this machine), when it has no heartbeat, or when its heartbeat is still
            // ARGV[4] (the caller watched it stay so for WORKER_DEAD_AFTER).
            // Returns {1, '', '', 0} or {0, holder, its heartbeat, the heartbeat's age in ms}.
            register: Script::new(&format!(
                r"{NOW_MS}
                  local now = redis_ms()
                  local holder = redis.call('HGET', KEYS[2], ARGV[1])
                  local beat = redis.call('ZSCORE', KEYS[1], ARGV[1])
                  if holder and holder ~= ARGV[2] and holder ~= ARGV[3]
                     and beat and beat ~= ARGV[4] then
                    return {{0, holder, beat, now - tonumber(beat)}}
                  end
                  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
                  redis.call('ZADD', KEYS[1], now, ARGV[1])
                  return {{1, '', '', 0}}"
            )),
            // Refreshes the heartbeat in Redis time, unless another process has taken the id
            // (returns 0 then). Other workers judge liveness by whether this value changes,
            // not by comparing it with a clock.
            heartbeat: Script::new(&format!(
                r"{NOW_MS}
                  local holder = redis.call('HGET', KEYS[2], ARGV[1])
                  if holder and holder ~= ARGV[2] then return 0 end
                  if not holder then redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end
                  redis.call('ZADD', KEYS[1], redis_ms(), ARGV[1])
                  return 1"
            )),
            // Reaps worker ARGV[1] if its heartbeat is still ARGV[2], the value the reaper saw
            // stay unchanged for WORKER_DEAD_AFTER of its own time: its processing list KEYS[3]
            // goes to the front of the queue KEYS[4], oldest first, each item's reclaim count
            // in KEYS[5] going up (at most ARGV[3] items counted), and it leaves the live set.
            // Returns the messages moved, or -1 when there was nothing to reap (another worker
            // got there first, or it came back).
            reap: Script::new(&format!(
                r"{COUNT_RECLAIM}
                  local beat = redis.call('ZSCORE', KEYS[1], ARGV[1])
                  if not beat or beat ~= ARGV[2] then return -1 end
                  local n = 0
                  local item = redis.call('LMOVE', KEYS[3], KEYS[4], 'LEFT', 'RIGHT')
                  while item do
                    n = n + 1
                    count_reclaim(KEYS[5], item, tonumber(ARGV[3]))
                    item = redis.call('LMOVE', KEYS[3], KEYS[4], 'LEFT', 'RIGHT')
                  end
                  if n > 0 then redis.call('EXPIRE', KEYS[5], 604800) end
                  redis.call('ZREM', KEYS[1], ARGV[1])
                  redis.call('HDEL', KEYS[2], ARGV[1])
                  return n"
            )),
            // Leaves the live set, if the id is still this process's.
            deregister: Script::new(
                r"local holder = redis.call('HGET', KEYS[2], ARGV[1])
                  if holder and holder ~= ARGV[2] then return 0 end
                  redis.call('HDEL', KEYS[2], ARGV[1])
                  redis.call('ZREM', KEYS[1], ARGV[1])
                  return 1",
            ),
        }
    }
}

/// What stands in a dead-letter list for a record that `dlq_requeue` or `dlq_drop` took out,
/// until `LREM` removes it at the end of a page: setting it keeps every other record at its
/// place, so a walk by position is not disturbed by its own removals. Readers skip it.
pub const DLQ_TOMBSTONE: &[u8] = b"\x00courier:dlq:removed";

/// Reads part of the dead-letter list KEYS[1] by position counted from the tail (1 = the
/// oldest; a position is stable while workers LPUSH new dead letters at the head). From
/// position ARGV[1] (0 with ARGV[2] = -1: the newest, LLEN), in direction ARGV[2] (1: toward
/// the newer, -1: toward the older), at most ARGV[3] records, stopping once the records read
/// add up to ARGV[4] bytes. Reads with LRANGE in chunks of ARGV[5] records at first, then as
/// many as fit the byte budget at the size of the largest seen (1 to 256), so that huge
/// records are read one at a time. Each record comes back cut to ARGV[6] bytes (0: whole), with
/// its SHA-1 with ARGV[8] = '1', and only up to its first newline (the header) with ARGV[10] =
/// '1'. Records that do not contain ARGV[7] (plain text; '' matches all) are only counted.
/// Returns {next position, the chunk size to start the next call with, LLEN, tombstones
/// passed, records without the text, {position, size, bytes, 1, sha}...}.
pub(super) fn dlq_page() -> Script {
    Script::new(
        r"local key = KEYS[1]
          local p, dir = tonumber(ARGV[1]), tonumber(ARGV[2])
          local max_items, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
          local chunk, cap = tonumber(ARGV[5]), tonumber(ARGV[6])
          local grep, want_sha = ARGV[7], ARGV[8] == '1'
          local len = redis.call('LLEN', key)
          if p == 0 and dir < 0 then p = len end
          local out = {0, 0, len, 0, 0}
          local used, n, tombs, biggest, misses = 0, 0, 0, 1, 0
          while n < max_items and used < budget and p >= 1 and p <= len do
            local k = math.max(1, math.min(chunk, max_items - n))
            local a, b
            if dir > 0 then
              a, b = p, math.min(p + k - 1, len)
            else
              a, b = math.max(p - k + 1, 1), p
            end
            local items = redis.call('LRANGE', key, -b, -a)
            local count = #items
            if count == 0 then break end
            for j = 1, count do
              local i = j
              if dir > 0 then i = count - j + 1 end
              local item = items[i]
              local size = #item
              used = used + size
              if size > biggest then biggest = size end
              if item == ARGV[9] then
                tombs = tombs + 1
              elseif grep == '' or string.find(item, grep, 1, true) then
                local sha = ''
                if want_sha then sha = redis.sha1hex(item) end
                local shown = item
                if cap > 0 and size > cap then shown = string.sub(item, 1, cap) end
                if ARGV[10] == '1' then
                  local newline = string.find(shown, '\n', 1, true)
                  if newline then shown = string.sub(shown, 1, newline) end
                end
                out[#out + 1] = {b - (i - 1), size, shown, 1, sha}
              else
                misses = misses + 1
              end
              n = n + 1
            end
            items = nil
            if dir > 0 then p = b + 1 else p = a - 1 end
            chunk = math.max(1, math.min(256, math.floor(budget / biggest)))
          end
          out[1], out[2], out[4], out[5] = p, chunk, tombs, misses
          return out",
    )
}

/// Moves the dead letter at position ARGV[1] (from the tail) of KEYS[1] to the queue KEYS[2]
/// as the message ARGV[3], if the record there still has SHA-1 ARGV[2]: copies it to the back
/// of the queue (ARGV[4] = '0', LPUSH, like a new message) or the front ('1', RPUSH), then
/// sets the tombstone ARGV[5] in its place. 1: moved; 0: the record there is another one now
/// (moved or removed by someone else meanwhile).
pub(super) fn dlq_requeue() -> Script {
    Script::new(
        r"local at = -tonumber(ARGV[1])
          local item = redis.call('LINDEX', KEYS[1], at)
          if not item or item == ARGV[5] or redis.sha1hex(item) ~= ARGV[2] then return 0 end
          if ARGV[4] == '1' then
            redis.call('RPUSH', KEYS[2], ARGV[3])
          else
            redis.call('LPUSH', KEYS[2], ARGV[3])
          end
          redis.call('LSET', KEYS[1], at, ARGV[5])
          return 1",
    )
}

/// Deletes the dead letter at position ARGV[1] (from the tail) of KEYS[1] if the record there
/// still has SHA-1 ARGV[2], by setting the tombstone ARGV[3] in its place. 1: deleted, 0: the
/// record there is another one now.
pub(super) fn dlq_drop() -> Script {
    Script::new(
        r"local at = -tonumber(ARGV[1])
          local item = redis.call('LINDEX', KEYS[1], at)
          if not item or item == ARGV[3] or redis.sha1hex(item) ~= ARGV[2] then return 0 end
          redis.call('LSET', KEYS[1], at, ARGV[3])
          return 1",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_claim_headers_fit_in_a_lua_long_string() {
        let ClaimHeaders { too_large, poisoned } = claim_headers();
        for header in [too_large, poisoned] {
            assert!(!header.contains("]]") && !header.contains('\n'), "{header}");
        }
    }
}
