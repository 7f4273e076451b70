-- One worker's heartbeat (worker/operate/heartbeat.py): its hash, with a TTL, and its place in
-- bf:workers by when it expires; nodes whose beats ended long ago leave the set. Runs on a
-- full Redis too (a few bytes; `health` needs it). Its contract and lib.lua are prepended:
-- the node, ttl_s, then field, value pairs (scripts.BEAT).
local node, ttl = ARGV[ARG.node], tonumber(ARGV[ARG.ttl_s])
if not ttl or ttl < 1 or #ARGV % 2 ~= 1 then
  return redis.error_reply('beat: bad argument')
end
local key = worker_key(node)
local fields = {}
for at = FIRST, #ARGV - 1, WIDTH do
  fields[#fields + 1] = ARGV[at + EACH.field]
  fields[#fields + 1] = ARGV[at + EACH.value]
end
if #fields > 0 then
  redis.call('HSET', key, unpack(fields))
end
redis.call('EXPIRE', key, ttl)
local now = now_ms()
redis.call('ZADD', KEY.workers, now + ttl * 1000, node)
redis.call('ZREMRANGEBYSCORE', KEY.workers, '-inf', now - 10 * ttl * 1000)  -- clocks drift
return 1
