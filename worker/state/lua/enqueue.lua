-- Store deliveries unless the same record is pending or delivered (idempotent enqueue).
-- A delivery_id is derived from the record's four fields, so the delivery itself (or,
-- once delivered, its marker) is the idempotency key: nothing is stored twice. One call
-- takes one record or a whole batch. Its contract and lib.lua are prepended (scripts.ENQUEUE):
-- lane (l/b), caller ('' for none), due in ms, wake queue ('' for no wake-up), wake-up
-- message, index ('1' to keep the lookup index: BACKFILL_LOOKUP_INDEX, '0' not), then per
-- record: id, app_id, msgid ('' for none), number, time.
-- Returns per record {created (1/0), delivery_id}, flattened. A record that is dead is
-- brought back (same delivery_id, a fresh attempt budget). A caller (an intake token's
-- name) joins the delivery's callers, also when it was there already.
-- Each new (or revived) delivery is entered in its app's lookup index as '<msgid>\0<id>'
-- ('\0<id>' without a msgid), and the run sweeps twice as many index entries as it adds
-- (index.lua, prepended). An index key of the wrong type is left alone (not indexed, logged
-- by Redis): the lookup index never stops a delivery.
-- Every argument and every key's type is checked before the first write.
local n = (#ARGV - FIRST) / WIDTH
local lane, caller, due_in = ARGV[ARG.lane], ARGV[ARG.caller], num(ARGV[ARG.due_in_ms], 0, 1e11)
local wake_queue, index_flag = ARGV[ARG.wake_queue], ARGV[ARG.index]
if n < 1 or n ~= math.floor(n) or (lane ~= 'l' and lane ~= 'b') or not due_in
    or string.find(caller, '[,|]') or (wake_queue ~= '' and ARGV[ARG.wake] == '')
    or (index_flag ~= '0' and index_flag ~= '1') then
  return redis.error_reply('enqueue: bad argument')
end
local states = {}  -- each record's current state ('p', 'x', 'd', or false when new)
for i = 0, n - 1 do
  local a = FIRST + WIDTH * i
  local id, app = ARGV[a + EACH.id], ARGV[a + EACH.app_id]
  if not string.match(id, '^[%w_-]+$') or app == '' or ARGV[a + EACH.number] == ''
      or not string.match(ARGV[a + EACH.time], '^%d+$')
      or string.find(app .. ARGV[a + EACH.msgid], '\0', 1, true) then
    return redis.error_reply('enqueue: bad argument: record ' .. i)
  end
  local state = redis.pcall('HGET', delivery_key(id), F.state)
  if type(state) == 'table' and state['err'] then
    return redis.error_reply('enqueue: corrupt state: ' .. delivery_key(id)
      .. ' is not a hash')
  end
  states[i] = state
end

local function typed(key, want)
  local kind = redis.call('TYPE', key)['ok']
  if kind == want or kind == 'none' then
    return true
  end
  redis.log(redis.LOG_WARNING, 'backfill enqueue: ' .. key .. ' is a ' .. kind .. ': not indexed')
  return false
end
local indexing = index_flag == '1' and typed(KEY.index_apps, 'zset')
  and typed(KEY.index_hand, 'hash')
local indexable = {}  -- app_id -> whether its index may be written
for i = 0, n - 1 do
  local app = ARGV[FIRST + WIDTH * i + EACH.app_id]
  if indexable[app] == nil then
    indexable[app] = indexing and typed(directory_key(app), 'zset')
  end
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
local entries, apps = {}, {}  -- app_id -> its new index entries; apps in order
local out, created, scheduled, seen = {}, 0, {}, {}
for i = 0, n - 1 do
  local a = FIRST + WIDTH * i
  local id = ARGV[a + EACH.id]
  local key = delivery_key(id)
  local state = states[i]
  if seen[id] then
    state = 'again'  -- the same record earlier in this batch: dealt with there
  end
  seen[id] = true
  local marker, marker_at = false, marker_key(id)
  if state ~= 'again' and (not state or (state == 'd' and caller ~= '')) then
    marker = redis.call('GET', marker_at)
  end
  local new = 0
  if marker then
    -- delivered within the dedupe window: "<delivered ms>|<callers>"
    local at, callers = string.match(marker, '^([^|]*)|?(.*)$')
    local joined = with_caller(callers)
    if joined ~= callers then
      redis.call('SET', marker_at, at .. '|' .. joined, 'KEEPTTL')
    end
  elseif state == 'x' then
    local app = redis.call('HGET', key, F.app_id) or ''
    redis.call('HSET', key, F.state, 'p', F.attempts, 0, F.due, due, F.lease, 0, F.replay, 1,
      F.lane, lane)
    redis.call('HDEL', key, F.dead_at, F.suspect)
    redis.call('ZREM', KEY.dead, id)
    redis.call('ZREM', dead_app_key(app), id)
    new = 1
  elseif not state then
    local fields = {F.app_id, ARGV[a + EACH.app_id], F.number, ARGV[a + EACH.number], F.time,
      ARGV[a + EACH.time], F.state, 'p', F.due, due, F.created, now, F.lane, lane}
    if ARGV[a + EACH.msgid] ~= '' then
      fields[#fields + 1] = F.msgid
      fields[#fields + 1] = ARGV[a + EACH.msgid]
    end
    if caller ~= '' then
      fields[#fields + 1] = F.callers
      fields[#fields + 1] = caller
    end
    redis.call('HSET', key, unpack(fields))
    new = 1
  end
  -- pending, revived, or delivered but kept a while (read first by status): the hash too
  if caller ~= '' and state and state ~= 'again' then
    local callers = redis.call('HGET', key, F.callers)
    local joined = with_caller(callers)
    if joined ~= callers then
      redis.call('HSET', key, F.callers, joined)
    end
  end
  if new == 1 then
    scheduled[#scheduled + 1] = due
    scheduled[#scheduled + 1] = id
    local app = ARGV[a + EACH.app_id]
    if indexable[app] then
      if not entries[app] then
        entries[app] = {}
        apps[#apps + 1] = app
      end
      local list = entries[app]
      list[#list + 1] = ARGV[a + EACH.msgid] .. '\0' .. id
    end
  end
  created = created + new
  out[#out + 1] = new
  out[#out + 1] = id
end
-- one ZADD for the batch (unpack takes a few thousand values; batches are 1,000 records)
for first = 1, #scheduled, 2000 do
  redis.call('ZADD', lane_key(lane), unpack(scheduled, first, math.min(first + 1999, #scheduled)))
end
-- the index entries, and two entries checked per entry added: so an app's index stays
-- within about twice the deliveries it points at (see lookup.py)
for _, app in ipairs(apps) do
  local list = entries[app]
  for _, entry in ipairs(list) do
    index_add(app, entry)
  end
  redis.call('ZADD', KEY.index_apps, 0, app)
  index_sweep(app, 2 * #list)
end
if #apps > 0 then
  -- and a few of the next app's, in turn, so an app that stopped enqueuing is swept too
  local last = redis.call('HGET', KEY.index_hand, '')
  local next_app = redis.call('ZRANGEBYLEX', KEY.index_apps, last and '(' .. last or '-', '+',
    'LIMIT', 0, 1)[1]
  if not next_app and last then
    next_app = redis.call('ZRANGEBYLEX', KEY.index_apps, '-', '+', 'LIMIT', 0, 1)[1]
  end
  if next_app then
    redis.call('HSET', KEY.index_hand, '', next_app)
    index_sweep(next_app, 16)
  end
end
if created > 0 and wake_queue ~= '' then
  redis.call('LPUSH', wake_queue, ARGV[ARG.wake])  -- wake a worker: the record goes out at once
end
return out
