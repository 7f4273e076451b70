-- Pick deliveries that are due (or overdue: dispatched or leased but never finished) and
-- push their next look-at time out by requeue_after, so each is dispatched once per period.
-- KEYS: schedule, paused, probe, probe_lock, queue
-- ARGV: limit, requeue_after_s, high_water, probe_lease_ms
-- Returns the delivery ids to dispatch now.
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {}
end
local limit = tonumber(ARGV[1])
local room = tonumber(ARGV[3]) - redis.call('LLEN', KEYS[5])
if room < limit then
  limit = room
end
if limit <= 0 then
  return {}
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  -- after a pause one delivery probes the account before the fleet resumes
  if not redis.call('SET', KEYS[4], '1', 'NX', 'PX', tonumber(ARGV[4])) then
    return {}
  end
  limit = 1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
local later = now + tonumber(ARGV[2])
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], later, id)
end
return ids
