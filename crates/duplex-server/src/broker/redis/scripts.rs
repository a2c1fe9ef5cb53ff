//! The Lua scripts of the Redis broker: publishing (offset, history append and broadcast in one
//! step) and presence (join, leave, and reading with expired entries swept and announced).

use redis::Script;

/// Allocates the next offset, appends to the history stream and broadcasts, atomically. With
/// an idempotency key (`KEYS[3]`, digest `ARGV[7]`, window `ARGV[8]` ms): when the key names an
/// earlier publication, `{0, 'offset:epoch:digest'}` and nothing else; otherwise the key is set
/// to name this one, in the same step.
const PUBLISH: &str = r"
if KEYS[3] then
  local earlier = redis.call('GET', KEYS[3])
  if earlier then return {0, earlier} end
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[6]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'top', 0)
end
local offset = redis.call('HINCRBY', KEYS[1], 'top', 1)
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], offset .. '-0', 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[1], 'p' .. offset .. ':' .. epoch .. ':' .. ARGV[2])
if KEYS[3] then
  redis.call('SET', KEYS[3], offset .. ':' .. epoch .. ':' .. ARGV[7], 'PX', ARGV[8])
end
return {offset, epoch}
";

/// The channel's epoch, last offset, oldest kept entry and the entries asked for.
const HISTORY: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[4]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'top', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
local top = redis.call('HGET', KEYS[1], 'top')
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local oldest = ''
if #first > 0 then oldest = first[1][1] end
local entries = {}
if ARGV[1] == 'after' then
  entries = redis.call('XRANGE', KEYS[2], '(' .. ARGV[2] .. '-0', '+', 'COUNT', ARGV[5])
elseif ARGV[1] == 'last' then
  entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', ARGV[5])
end
return {top, epoch, oldest, entries}
";

/// The server's clock in milliseconds, as `now`, for the presence scripts.
const NOW_MS: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

const JOIN: &str = r"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1])
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
return 1
";

const LEAVE: &str = r"
local message = redis.call('HGET', KEYS[3], ARGV[1])
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if removed == 1 and message then redis.call('PUBLISH', ARGV[2], message) end
return removed
";

const PRESENCE: &str = r"
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, client in ipairs(expired) do
  local message = redis.call('HGET', KEYS[3], client)
  redis.call('HDEL', KEYS[1], client)
  redis.call('HDEL', KEYS[3], client)
  redis.call('ZREM', KEYS[2], client)
  if message then redis.call('PUBLISH', ARGV[1], message) end
end
return redis.call('HVALS', KEYS[1])
";

/// The scripts; `redis::Script` runs them by their SHA and loads one the server lacks.
#[derive(Debug)]
pub(super) struct Scripts {
    pub(super) publish: Script,
    pub(super) history: Script,
    pub(super) join: Script,
    pub(super) leave: Script,
    pub(super) presence: Script,
}

impl Scripts {
    pub(super) fn new() -> Scripts {
        let now = |body: &str| Script::new(&format!("{NOW_MS}{body}"));
        Scripts {
            publish: Script::new(PUBLISH),
            history: Script::new(HISTORY),
            join: now(JOIN),
            leave: Script::new(LEAVE),
            presence: now(PRESENCE),
        }
    }
}
