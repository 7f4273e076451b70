-- Take a delivery for one attempt, if it is pending, due and not held by another attempt.
-- KEYS: delivery, schedule, paused, rate (see gcra.lua, prepended)
-- ARGV: delivery_id, lease_s, rate_per_s, burst, max_wait_s
-- Returns {verdict, ...}: 'claimed' with the claim token and the record, or why not.
local h = redis.call('HMGET', KEYS[1], 'state', 'due_at', 'lease_until', 'attempts',
  'app_id', 'msgid', 'number', 'time', 'dedupe', 'replay')
local state = h[1]
if not state then
  return {'missing'}
end
if state == 'delivered' then
  return {'delivered', h[4] or '0', h[5], h[6], h[7], h[8]}
end
if state ~= 'pending' then
  return {state}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if (tonumber(h[3]) or 0) > now then
  return {'busy'}
end
local pause_ms = redis.call('PTTL', KEYS[3])
if pause_ms > 0 then
  local resume = now + pause_ms / 1000
  redis.call('HSET', KEYS[1], 'due_at', resume)
  redis.call('ZADD', KEYS[2], resume, ARGV[1])
  return {'paused', tostring(resume)}
end
if tonumber(h[2]) > now + 0.5 then
  return {'early'}
end
local wait = rate_wait(KEYS[4], now, tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]))
if wait < 0 then
  -- the fleet is at its rate limit for longer than an attempt may wait: come back then
  redis.call('HSET', KEYS[1], 'due_at', now - wait)
  redis.call('ZADD', KEYS[2], now - wait, ARGV[1])
  return {'throttled', tostring(-wait)}
end
local token = redis.call('HINCRBY', KEYS[1], 'claims', 1)
local lease_until = now + wait + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'lease_until', lease_until)
redis.call('ZADD', KEYS[2], lease_until, ARGV[1])
return {'claimed', tostring(token), h[4] or '0', h[5], h[6], h[7], h[8], h[9], h[10] or '0',
  tostring(wait)}
