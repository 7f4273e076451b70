-- One worker's heartbeat (worker/heartbeat.py): its hash, with a TTL, and its place in
-- bf:workers by when it expires; nodes whose beats ended long ago leave the set. Runs on a
-- full Redis too (a few bytes; `health` needs it). lib.lua is prepended.
-- ARGV: node, ttl_s, then field, value pairs; last: the key prefix.
local node, ttl = ARGV[1], tonumber(ARGV[2])
if not ttl or ttl < 1 or #ARGV % 2 ~= 1 then
  return redis.error_reply('beat: bad argument')
end
local key = P .. 'worker:' .. node
local fields = {}
for i = 3, #ARGV - 1 do
  fields[#fields + 1] = ARGV[i]
end
if #fields > 0 then
  redis.call('HSET', key, unpack(fields))
end
redis.call('EXPIRE', key, ttl)
local now = now_ms()
redis.call('ZADD', P .. 'workers', now + ttl * 1000, node)
redis.call('ZREMRANGEBYSCORE', P .. 'workers', '-inf', now - 10 * ttl * 1000)  -- clocks drift
return 1
