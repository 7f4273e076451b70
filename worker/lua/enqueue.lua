-- Store deliveries unless the same record is pending or delivered (idempotent enqueue).
-- A delivery_id is derived from the record's four fields, so the delivery itself (or,
-- once delivered, its marker) is the idempotency key: nothing is stored twice. One call
-- takes one record or a whole batch. lib.lua is prepended.
-- ARGV: 1 lane (l/b)  2 caller ('' for none)  3 due in ms  4 queue ('' for no wake-up)
--       5 wake-up message, then per record: id, app_id, msgid ('' for none), number, time;
--       last: the key prefix
-- Returns per record {created (1/0), delivery_id}, flattened. A record that is dead is
-- brought back (same delivery_id, a fresh attempt budget). A caller (an intake token's
-- name) joins the delivery's callers, also when it was there already.
-- Every argument and every key's type is checked before the first write.
local n = (#ARGV - 6) / 5
local lane, caller, due_in = ARGV[1], ARGV[2], num(ARGV[3], 0, 1e11)
if n < 1 or n ~= math.floor(n) or (lane ~= 'l' and lane ~= 'b') or not due_in
    or string.find(caller, '[,|]') or (ARGV[4] ~= '' and ARGV[5] == '') then
  return redis.error_reply('enqueue: bad argument')
end
local states = {}  -- each record's current state ('p', 'x', 'd', or false when new)
for i = 0, n - 1 do
  local a = 6 + 5 * i
  if not string.match(ARGV[a], '^[%w_-]+$') or ARGV[a + 1] == '' or ARGV[a + 3] == ''
      or not string.match(ARGV[a + 4], '^%d+$') then
    return redis.error_reply('enqueue: bad argument: record ' .. i)
  end
  local state = redis.pcall('HGET', delivery_key(ARGV[a]), 's')
  if type(state) == 'table' and state['err'] then
    return redis.error_reply('enqueue: corrupt state: ' .. delivery_key(ARGV[a])
      .. ' is not a hash')
  end
  states[i] = state
end

local function with_caller(callers)
  if caller == '' then
    return callers
  end
  if not callers or callers == '' then
    return caller
  end
  if string.find(',' .. callers .. ',', ',' .. caller .. ',', 1, true) then
    return callers
  end
  return callers .. ',' .. caller
end

local now = now_ms()
local due = now + due_in
local out, created, scheduled, seen = {}, 0, {}, {}
for i = 0, n - 1 do
  local a = 6 + 5 * i
  local id = ARGV[a]
  local key = delivery_key(id)
  local state = states[i]
  if seen[id] then
    state = 'again'  -- the same record earlier in this batch: dealt with there
  end
  seen[id] = true
  local marker_key, marker = P .. 'k:' .. id, false
  if state ~= 'again' and (not state or (state == 'd' and caller ~= '')) then
    marker = redis.call('GET', marker_key)
  end
  local new = 0
  if marker then
    -- delivered within the dedupe window: "<delivered ms>|<callers>"
    local at, callers = string.match(marker, '^([^|]*)|?(.*)$')
    local joined = with_caller(callers)
    if joined ~= callers then
      redis.call('SET', marker_key, at .. '|' .. joined, 'KEEPTTL')
    end
  elseif state == 'x' then
    local app = redis.call('HGET', key, 'a') or ''
    redis.call('HSET', key, 's', 'p', 'c', 0, 'u', due, 'l', 0, 'r', 1, 'q', lane)
    redis.call('HDEL', key, 'z')
    redis.call('ZREM', DEAD, id)
    redis.call('ZREM', dead_app_key(app), id)
    new = 1
  elseif not state then
    local fields = {'a', ARGV[a + 1], 'n', ARGV[a + 3], 't', ARGV[a + 4], 's', 'p', 'u', due,
      'w', now, 'q', lane}
    if ARGV[a + 2] ~= '' then
      fields[#fields + 1] = 'm'
      fields[#fields + 1] = ARGV[a + 2]
    end
    if caller ~= '' then
      fields[#fields + 1] = 'i'
      fields[#fields + 1] = caller
    end
    redis.call('HSET', key, unpack(fields))
    new = 1
  end
  -- pending, revived, or delivered but kept a while (read first by status): the hash too
  if caller ~= '' and state and state ~= 'again' then
    local callers = redis.call('HGET', key, 'i')
    local joined = with_caller(callers)
    if joined ~= callers then
      redis.call('HSET', key, 'i', joined)
    end
  end
  if new == 1 then
    scheduled[#scheduled + 1] = due
    scheduled[#scheduled + 1] = id
  end
  created = created + new
  out[#out + 1] = new
  out[#out + 1] = id
end
-- one ZADD for the batch (unpack takes a few thousand values; batches are 1,000 records)
for first = 1, #scheduled, 2000 do
  redis.call('ZADD', lane_key(lane), unpack(scheduled, first, math.min(first + 1999, #scheduled)))
end
if created > 0 and ARGV[4] ~= '' then
  redis.call('LPUSH', ARGV[4], ARGV[5])  -- wake a worker: the record goes out at once
end
return out
