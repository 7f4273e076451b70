-- Record one attempt and move the delivery on: delivered, retry later, dead, or paused.
-- The attempt was counted when it was claimed (claim.lua); a paused attempt gives it back.
-- KEYS: delivery, attempts, schedule, dead, dedupe, paused, probe, probe_lock, rate
-- ARGV: delivery_id, token, outcome, attempt_json, counted, retry_in_s, dedupe_ttl_s,
--       pause_s, last_error, pause_reason, hold_s (> 0: the provider said "too frequent"),
--       history (how many attempt documents to keep)
-- Returns {verdict, first_pause}: first_pause is 1 when this attempt started a pause.
-- Every argument is checked before the first write, so a bad one changes nothing.
local id, token, outcome = ARGV[1], ARGV[2], ARGV[3]
local retry_in, ttl, pause_s = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local hold, history = tonumber(ARGV[11]), tonumber(ARGV[12])
local function bad(x, lo, hi)
  return x == nil or x ~= x or x < lo or x > hi
end
local outcomes = {delivered = true, duplicate = true, retry = true, dead = true, paused = true}
if not outcomes[outcome] or (ARGV[5] ~= '0' and ARGV[5] ~= '1')
    or bad(retry_in, 0, 1e8) or bad(ttl, 1, 1e9) or bad(pause_s, 0.001, 864e3)
    or bad(hold, 0, 86400) or bad(history, 1, 10000) or string.len(ARGV[4]) > 65536 then
  return redis.error_reply('finish: bad argument')
end
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then
  return {'missing', 0}
end
local current, attempts = unpack(redis.call('HMGET', KEYS[1], 'claims', 'attempts'))
if attempts and not string.match(attempts, '^%-?%d+$') then
  return redis.error_reply('finish: corrupt attempts field')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
ttl = math.floor(ttl)
local pause_ms = math.max(math.floor(pause_s * 1000), 1)
redis.call('RPUSH', KEYS[2], ARGV[4])
redis.call('LTRIM', KEYS[2], -history, -1)
if hold > 0 then
  -- slow the whole fleet down: no worker sends before now + hold
  local until_ = now + hold
  if (tonumber(redis.call('GET', KEYS[9])) or 0) < until_ then
    redis.call('SET', KEYS[9], tostring(until_), 'PX', math.ceil(hold * 1000) + 1000)
  end
end
local delivered = outcome == 'delivered' or outcome == 'duplicate'
if outcome ~= 'paused' then
  -- any answer but "account blocked" proves the account works again
  redis.call('DEL', KEYS[7], KEYS[8])
end
if current ~= token and not delivered then
  -- a newer claim owns the delivery now; keep this attempt in the history only
  return {'stale', 0}
end
if ARGV[5] == '0' then
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
end
redis.call('HSET', KEYS[1], 'lease_until', 0, 'updated_at', now, 'last_error', ARGV[9])
if delivered then
  redis.call('HSET', KEYS[1], 'state', 'delivered', 'delivered_at', now)
  redis.call('ZREM', KEYS[3], id)
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('SET', KEYS[5], id, 'EX', ttl)
  return {'delivered', 0}
end
if outcome == 'retry' then
  local due = now + retry_in
  redis.call('HSET', KEYS[1], 'due_at', due)
  redis.call('ZADD', KEYS[3], due, id)
  return {'retry', 0}
end
if outcome == 'dead' then
  redis.call('HSET', KEYS[1], 'state', 'dead', 'dead_at', now)
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZADD', KEYS[4], now, id)
  -- a dead record is neither pending nor delivered: enqueuing it again starts afresh
  if redis.call('GET', KEYS[5]) == id then
    redis.call('DEL', KEYS[5])
  end
  return {'dead', 0}
end
-- paused: the account is blocked (or the provider redirects); hold the whole fleet
local first = redis.call('SET', KEYS[6], ARGV[10], 'NX', 'PX', pause_ms)
redis.call('SET', KEYS[7], '1')
redis.call('DEL', KEYS[8])
local resume = now + math.max(redis.call('PTTL', KEYS[6]), 0) / 1000
redis.call('HSET', KEYS[1], 'due_at', resume)
redis.call('ZADD', KEYS[3], resume, id)
if first then
  return {'paused', 1}
end
return {'paused', 0}
