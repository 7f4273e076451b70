-- Take a delivery for one attempt, if it is pending, due and not held by another attempt.
-- The attempt is counted here, at the claim: an attempt that never finishes (a hung
-- provider, a crash, a killed worker) still uses the budget, and a delivery whose budget
-- was spent by claims that never finished is dead-lettered as a poison record.
-- KEYS: delivery, schedule, paused, rate (see gcra.lua, prepended), dead
-- ARGV: delivery_id, lease_s, rate_per_s, burst, max_wait_s, max_attempts, pause_ms
-- Returns {verdict, ...}: 'claimed' with the claim token and the record, or why not.
-- Every argument and every field read is checked before the first write.
local lease_s, rate, burst = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local max_wait, max_attempts, pause_ms = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local function bad(x, lo, hi)
  return x == nil or x ~= x or x < lo or x > hi
end
if bad(lease_s, 0.001, 86400) or bad(rate, 0, 1e6) or bad(burst, 1, 1e6)
    or bad(max_wait, 0, 3600) or bad(max_attempts, 1, 1000) or bad(pause_ms, 1, 864e5) then
  return redis.error_reply('claim: bad argument')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local id = ARGV[1]

-- Move a delivery to the dead letters for good, with the reason; once.
local function bury(reason, dedupe)
  redis.call('HSET', KEYS[1], 'state', 'dead', 'dead_at', now, 'last_error', reason,
    'lease_until', 0)
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[5], now, id)
  if dedupe and redis.call('GET', dedupe) == id then
    redis.call('DEL', dedupe)
  end
end

local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'none' then
  -- an orphan: scheduled, but its delivery is gone; it is dropped from the schedule once
  if redis.call('ZREM', KEYS[2], id) == 1 then
    return {'orphan'}
  end
  return {'missing'}
end
if kind ~= 'hash' then
  -- keep whatever is there under another name, and leave a dead letter that says why
  redis.call('RENAME', KEYS[1], KEYS[1] .. ':corrupt')
  bury('corrupt state: type (' .. kind .. ', kept as ' .. KEYS[1] .. ':corrupt)', nil)
  return {'corrupt', 'type'}
end
local h = redis.call('HMGET', KEYS[1], 'state', 'due_at', 'lease_until', 'attempts',
  'app_id', 'msgid', 'number', 'time', 'dedupe', 'replay', 'claims')
local state = h[1]
local function finite(v)
  local x = tonumber(v)
  return x ~= nil and x == x and x ~= math.huge and x ~= -math.huge
end
local function numeric(v)
  return v == false or finite(v)
end
local function counter(v)  -- what HINCRBY accepts
  return v == false or (string.len(v) < 16 and string.match(v, '^%-?%d+$') ~= nil)
end
local field = nil
if state ~= 'pending' and state ~= 'delivered' and state ~= 'dead' then
  field = 'state'
elseif not finite(h[2]) then
  field = 'due_at'
elseif not numeric(h[3]) then
  field = 'lease_until'
elseif not counter(h[4]) then
  field = 'attempts'
elseif not counter(h[11]) then
  field = 'claims'
elseif not h[5] then
  field = 'app_id'
elseif not h[7] then
  field = 'number'
elseif not h[8] then
  field = 'time'
end
if field then
  if state == 'dead' then
    return {'dead'}
  end
  bury('corrupt state: ' .. field, h[9])
  return {'corrupt', field}
end
if state == 'delivered' then
  return {'delivered', h[4] or '0', h[5], h[6], h[7], h[8]}
end
if state == 'dead' then
  return {'dead'}
end
if (tonumber(h[3]) or 0) > now then
  return {'busy'}
end
local pttl = redis.call('PTTL', KEYS[3])
if pttl == -1 then
  -- a pause always has a TTL; one without (a manual SET) is given the configured one
  redis.call('PEXPIRE', KEYS[3], pause_ms)
  pttl = pause_ms
end
if pttl > 0 then
  local resume = now + pttl / 1000
  redis.call('HSET', KEYS[1], 'due_at', resume)
  redis.call('ZADD', KEYS[2], resume, id)
  return {'paused', tostring(resume)}
end
if tonumber(h[2]) > now + 0.5 then
  return {'early'}
end
local attempts = tonumber(h[4]) or 0
if attempts >= max_attempts then
  bury('poison record: claimed ' .. attempts .. ' times without a recorded outcome', h[9])
  return {'poison', tostring(attempts), h[5], h[6], h[7], h[8]}
end
local wait = rate_wait(KEYS[4], now, rate, burst, max_wait)
if wait < 0 then
  -- the fleet is at its rate limit for longer than an attempt may wait: come back then
  redis.call('HSET', KEYS[1], 'due_at', now - wait)
  redis.call('ZADD', KEYS[2], now - wait, id)
  return {'throttled', tostring(-wait)}
end
local token = redis.call('HINCRBY', KEYS[1], 'claims', 1)
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
local lease_until = now + wait + lease_s
redis.call('HSET', KEYS[1], 'lease_until', lease_until)
redis.call('ZADD', KEYS[2], lease_until, id)
return {'claimed', tostring(token), tostring(attempts + 1), h[5], h[6], h[7], h[8], h[9] or '',
  h[10] or '0', tostring(wait)}
