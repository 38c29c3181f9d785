//! The Lua scripts: each one move of messages between keys of one queue, atomic, declaring
//! every key it touches (so each runs in one cluster slot), and safe to run twice.

use redis::Script;

/// Lua scripts, loaded once and run by hash.
pub(super) struct Scripts {
    pub(super) claim: Script,
    pub(super) retry: Script,
    pub(super) dead: Script,
    pub(super) release: Script,
    pub(super) promote: Script,
    pub(super) give_back: Script,
    pub(super) register: Script,
    pub(super) heartbeat: Script,
    pub(super) reap: Script,
    pub(super) deregister: Script,
}

impl Scripts {
    pub(super) fn new() -> Scripts {
        Scripts {
            // Moves up to ARGV[1] messages from the right of the ready list to the processing
            // list. An item over ARGV[2] bytes never travels to the worker: it goes straight to
            // the dead-letter list KEYS[3] as a record (header line, then the item as it is;
            // the same form as `message::dead_letter`). So does an item that workers dying
            // while holding it returned to the queue more than ARGV[5] times (counted in
            // KEYS[4] by its SHA-1; 0: never), as `poisoned`: looked up only while that hash
            // exists, so the happy path costs one EXISTS. ARGV[3] is the worker id as a JSON
            // string, ARGV[4] the time for `dead_at`. Returns {claimed items, too large,
            // poisoned}.
            claim: Script::new(
                r#"local items = redis.call('RPOP', KEYS[1], ARGV[1])
                  if not items then return {{}, 0, 0} end
                  local limit = tonumber(ARGV[2])
                  local max_reclaims = tonumber(ARGV[5])
                  local counted = max_reclaims > 0 and redis.call('EXISTS', KEYS[4]) == 1
                  local keep, big, poisoned = {}, 0, 0
                  for _, item in ipairs(items) do
                    local reclaims = 0
                    if counted then
                      reclaims = tonumber(redis.call('HGET', KEYS[4], redis.sha1hex(item)) or '0')
                    end
                    if #item > limit then
                      big = big + 1
                      redis.call('LPUSH', KEYS[3], '{"reason":"too_large","error":"message is ' .. #item
                        .. ' bytes, over the ' .. ARGV[2] .. '-byte limit (worker.max_message_bytes)","worker_id":'
                        .. ARGV[3] .. ',"dead_at":"' .. ARGV[4] .. '","size":' .. #item .. '}\n' .. item)
                    elseif reclaims > max_reclaims then
                      poisoned = poisoned + 1
                      redis.call('HDEL', KEYS[4], redis.sha1hex(item))
                      redis.call('LPUSH', KEYS[3], '{"reason":"poisoned","error":"returned to the queue '
                        .. reclaims .. ' times by the restart or reaping of workers that died holding it, over the limit of '
                        .. ARGV[5] .. ' (worker.max_reclaims)","worker_id":' .. ARGV[3] .. ',"dead_at":"' .. ARGV[4]
                        .. '","reclaims":' .. reclaims .. ',"size":' .. #item .. '}\n' .. item)
                    else
                      keep[#keep + 1] = item
                    end
                  end
                  if #keep > 0 then redis.call('LPUSH', KEYS[2], unpack(keep)) end
                  return {keep, big, poisoned}"#,
            ),
            // Moves one message from processing to the retry set, due ARGV[3] ms from now (Redis
            // time, so every worker agrees). A message no longer in processing (already settled,
            // or reaped) is left alone: running this twice does nothing the second time.
            retry: Script::new(
                r"if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 0 then return 0 end
                  local t = redis.call('TIME')
                  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
                  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[2])
                  return 1",
            ),
            // Moves one message from processing to the dead-letter list as its record ARGV[2].
            dead: Script::new(
                r"if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 0 then return 0 end
                  redis.call('LPUSH', KEYS[2], ARGV[2])
                  return 1",
            ),
            // Returns one message from processing KEYS[1] to the front of the ready list KEYS[2]
            // as it was: no attempt used.
            release: Script::new(
                r"if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 0 then return 0 end
                  redis.call('RPUSH', KEYS[2], ARGV[1])
                  return 1",
            ),
            // Moves up to ARGV[1] due retries to the back of the ready list; returns how many and
            // the ms until the next one is due (-1: none waiting).
            // Only while the ready list holds fewer than ARGV[2]: after an outage the retries
            // that fell due meanwhile join the queue no faster than workers take them, and
            // the rest wait in the retry set. Returns -2 for the wait when due retries were
            // held back for that.
            promote: Script::new(
                r"local t = redis.call('TIME')
                  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
                  local room = math.min(tonumber(ARGV[1]), tonumber(ARGV[2]) - redis.call('LLEN', KEYS[2]))
                  local due = {}
                  if room > 0 then
                    due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, room)
                  end
                  if #due > 0 then
                    redis.call('ZREM', KEYS[1], unpack(due))
                    redis.call('LPUSH', KEYS[2], unpack(due))
                  end
                  local next = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
                  if #next == 0 then return {#due, -1} end
                  if room <= 0 and tonumber(next[2]) <= now then return {#due, -2} end
                  return {#due, math.max(0, tonumber(next[2]) - now)}",
            ),
            // Returns a processing list KEYS[1] to the front of the ready list KEYS[2], oldest
            // claim first in line. With ARGV[1] = 1 (its worker died holding them) each item's
            // count in KEYS[3] goes up; the counts expire a week after the last one.
            give_back: Script::new(
                r"local n = 0
                  local item = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
                  while item do
                    n = n + 1
                    if ARGV[1] == '1' then redis.call('HINCRBY', KEYS[3], redis.sha1hex(item), 1) end
                    item = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
                  end
                  if n > 0 and ARGV[1] == '1' then redis.call('EXPIRE', KEYS[3], 604800) end
                  return n",
            ),
            // Takes worker id ARGV[1] for process ARGV[2], unless another process holds it with a
            // heartbeat younger than ARGV[3] ms (and is not ARGV[4], a holder known to be dead).
            // Returns {1, '', 0} or {0, holder, heartbeat age in ms}.
            register: Script::new(
                r"local t = redis.call('TIME')
                  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
                  local holder = redis.call('HGET', KEYS[2], ARGV[1])
                  local beat = redis.call('ZSCORE', KEYS[1], ARGV[1])
                  if holder and holder ~= ARGV[2] and holder ~= ARGV[4] and beat
                     and now - tonumber(beat) < tonumber(ARGV[3]) then
                    return {0, holder, now - tonumber(beat)}
                  end
                  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
                  redis.call('ZADD', KEYS[1], now, ARGV[1])
                  return {1, '', 0}",
            ),
            // Refreshes the heartbeat in Redis time, unless another process has taken the id
            // (returns 0 then).
            heartbeat: Script::new(
                r"local holder = redis.call('HGET', KEYS[2], ARGV[1])
                  if holder and holder ~= ARGV[2] then return 0 end
                  if not holder then redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end
                  local t = redis.call('TIME')
                  redis.call('ZADD', KEYS[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[1])
                  return 1",
            ),
            // Reaps worker ARGV[1] if its heartbeat is still older than ARGV[2] ms: its processing
            // list KEYS[3] goes to the front of the queue KEYS[4], oldest first, each item's
            // reclaim count in KEYS[5] going up, and it leaves the live set. Returns the messages moved, or -1 when there was nothing to reap
            // (another worker got there first, or it came back).
            reap: Script::new(
                r"local beat = redis.call('ZSCORE', KEYS[1], ARGV[1])
                  if not beat then return -1 end
                  local t = redis.call('TIME')
                  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
                  if now - tonumber(beat) < tonumber(ARGV[2]) then return -1 end
                  local n = 0
                  local item = redis.call('LMOVE', KEYS[3], KEYS[4], 'LEFT', 'RIGHT')
                  while item do
                    n = n + 1
                    redis.call('HINCRBY', KEYS[5], redis.sha1hex(item), 1)
                    item = redis.call('LMOVE', KEYS[3], KEYS[4], 'LEFT', 'RIGHT')
                  end
                  if n > 0 then redis.call('EXPIRE', KEYS[5], 604800) end
                  redis.call('ZREM', KEYS[1], ARGV[1])
                  redis.call('HDEL', KEYS[2], ARGV[1])
                  return n",
            ),
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
