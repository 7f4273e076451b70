-- Create deliveries unless the same record is pending or delivered (idempotent enqueue).
-- One call takes one record or a whole batch (one round trip, one script run).
-- KEYS: schedule, then per record: dedupe, delivery
-- ARGV: dedupe_ttl_s, dispatch_grace_s, source, then per record: id, app_id, msgid, number, time
-- Returns per record {created (1/0), delivery_id}, flattened.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl, due, source = tonumber(ARGV[1]), now + tonumber(ARGV[2]), ARGV[3]
local out = {}
for i = 0, (#KEYS - 1) / 2 - 1 do
  local dedupe, delivery, a = KEYS[2 + 2 * i], KEYS[3 + 2 * i], 4 + 5 * i
  local existing = redis.call('GET', dedupe)
  if existing then
    out[#out + 1] = 0
    out[#out + 1] = existing
  else
    local id = ARGV[a]
    redis.call('HSET', delivery,
      'app_id', ARGV[a + 1], 'msgid', ARGV[a + 2], 'number', ARGV[a + 3], 'time', ARGV[a + 4],
      'state', 'pending', 'created_at', now, 'due_at', now, 'dedupe', dedupe, 'source', source)
    redis.call('SET', dedupe, id, 'EX', ttl)
    redis.call('ZADD', KEYS[1], due, id)
    out[#out + 1] = 1
    out[#out + 1] = id
  end
end
return out
