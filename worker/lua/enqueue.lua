-- Create deliveries unless the same record is pending or delivered (idempotent enqueue).
-- One call takes one record or a whole batch (one round trip, one script run).
-- KEYS: schedule, then per record: dedupe, delivery
-- ARGV: dedupe_ttl_s, dispatch_grace_s, source, caller ('' for none), delivery key prefix,
--       then per record: id, app_id, msgid, number, time
-- Returns per record {created (1/0), delivery_id}, flattened.
-- A caller (an intake token's name) joins the delivery's comma-separated 'callers', also
-- when the record was already there: it may then read the delivery_id it was given.
-- Every argument is checked before the first write: a bad call writes nothing.
local function finite(x)
  return x ~= nil and x == x and x ~= math.huge and x ~= -math.huge
end

local records = (#KEYS - 1) / 2
if #KEYS < 3 or records ~= math.floor(records) or #ARGV ~= 5 + 5 * records then
  return redis.error_reply('enqueue: expected 1 + 2n keys and 5 + 5n arguments, got '
    .. #KEYS .. ' keys and ' .. #ARGV .. ' arguments')
end
local ttl, grace, source = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local caller, prefix = ARGV[4], ARGV[5]
if not finite(ttl) or ttl < 1 or ttl ~= math.floor(ttl) then
  return redis.error_reply('enqueue: dedupe_ttl_s must be a whole number of seconds >= 1')
end
if not finite(grace) or grace < 0 then
  return redis.error_reply('enqueue: dispatch_grace_s must be a finite number >= 0')
end
if source == '' or prefix == '' or string.find(caller, ',', 1, true) then
  return redis.error_reply('enqueue: source and key prefix must be set, caller without commas')
end
for i = 0, records - 1 do
  local a = 6 + 5 * i
  if ARGV[a] == '' or KEYS[3 + 2 * i] ~= prefix .. ARGV[a] then
    return redis.error_reply('enqueue: record ' .. i .. ': delivery key does not match its id')
  end
  if ARGV[a + 1] == '' or ARGV[a + 3] == '' then
    return redis.error_reply('enqueue: record ' .. i .. ': app_id and number must be set')
  end
  if not string.match(ARGV[a + 4], '^%d+$') or not finite(tonumber(ARGV[a + 4])) then
    return redis.error_reply('enqueue: record ' .. i .. ': time must be epoch milliseconds')
  end
end

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
for i = 0, records - 1 do
  local dedupe, delivery, a = KEYS[2 + 2 * i], KEYS[3 + 2 * i], 6 + 5 * i
  local existing = redis.call('GET', dedupe)
  if existing then
    local held = prefix .. existing
    if caller ~= '' and redis.call('EXISTS', held) == 1 then
      local callers = redis.call('HGET', held, 'callers') or ''
      if not string.find(',' .. callers .. ',', ',' .. caller .. ',', 1, true) then
        redis.call('HSET', held, 'callers', callers == '' and caller or callers .. ',' .. caller)
      end
    end
    out[#out + 1] = 0
    out[#out + 1] = existing
  else
    local id = ARGV[a]
    redis.call('HSET', delivery,
      'app_id', ARGV[a + 1], 'msgid', ARGV[a + 2], 'number', ARGV[a + 3], 'time', ARGV[a + 4],
      'state', 'pending', 'created_at', now, 'due_at', now, 'dedupe', dedupe, 'source', source)
    if caller ~= '' then
      redis.call('HSET', delivery, 'callers', caller)
    end
    redis.call('SET', dedupe, id, 'EX', ttl)
    redis.call('ZADD', KEYS[1], now + grace, id)
    out[#out + 1] = 1
    out[#out + 1] = id
  end
end
return out
