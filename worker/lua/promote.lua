-- Pick deliveries that are due (or overdue: dispatched or leased but never finished) and
-- push their next look-at time out by requeue_after, so each is dispatched once per period.
-- KEYS: schedule, paused, probe, probe_lock, queue
-- ARGV: limit, requeue_after_s, high_water, probe_lease_ms, pause_ms
-- Returns {queue length, ids to dispatch now}.
local limit, requeue_after = tonumber(ARGV[1]), tonumber(ARGV[2])
local high_water, probe_ms, pause_ms = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local function bad(x, lo, hi)
  return x == nil or x ~= x or x < lo or x > hi
end
if bad(limit, 0, 1e6) or bad(requeue_after, 0, 864e3) or bad(high_water, 0, 1e9)
    or bad(probe_ms, 1, 864e5) or bad(pause_ms, 1, 864e5) then
  return redis.error_reply('promote: bad argument')
end
local depth = redis.call('LLEN', KEYS[5])
local pttl = redis.call('PTTL', KEYS[2])
if pttl == -1 then
  -- a pause always has a TTL; one without (a manual SET) is given the configured one
  redis.call('PEXPIRE', KEYS[2], pause_ms)
end
if pttl ~= -2 then
  return {depth, {}}
end
local room = high_water - depth
if room < limit then
  limit = room
end
if limit <= 0 then
  return {depth, {}}
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  -- after a pause one delivery probes the account before the fleet resumes
  if not redis.call('SET', KEYS[4], '1', 'NX', 'PX', math.floor(probe_ms)) then
    return {depth, {}}
  end
  limit = 1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, math.floor(limit))
local later = now + requeue_after
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], later, id)
end
return {depth, ids}
