-- Bring a dead delivery back with a fresh attempt budget, same delivery_id.
-- KEYS: delivery, schedule, dead
-- ARGV: delivery_id, dedupe_ttl_s, dispatch_grace_s
-- Returns 1 when replayed, 0 when the delivery is not dead. Arguments are checked first.
local ttl, grace = tonumber(ARGV[2]), tonumber(ARGV[3])
if ttl == nil or ttl ~= ttl or ttl < 1 or ttl > 1e9
    or grace == nil or grace ~= grace or grace < 0 or grace > 864e3 then
  return redis.error_reply('replay: bad argument')
end
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' or redis.call('HGET', KEYS[1], 'state') ~= 'dead' then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local dedupe = redis.call('HGET', KEYS[1], 'dedupe')
redis.call('HSET', KEYS[1], 'state', 'pending', 'attempts', 0, 'due_at', now,
  'lease_until', 0, 'replay', 1, 'replayed_at', now)
redis.call('HDEL', KEYS[1], 'dead_at')
redis.call('ZADD', KEYS[2], now + grace, ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if dedupe then
  redis.call('SET', dedupe, ARGV[1], 'NX', 'EX', math.floor(ttl))
end
return 1
