-- The lookup index (keys.py, lookup.py), prepended to the scripts that write it (enqueue,
-- purge). An app's entries '<msgid>\0<id>' (ordered by name, scores 0) are split into
-- buckets of at most INDEX_BUCKET, each a sorted set small enough for Redis's compact
-- encoding (zset-max-listpack-entries, 128 by default): a bucket holds the entries from
-- its bound (the first entry it ever held, or '' for the lowest) to the next bucket's.
-- The directory lists the bounds, so an entry's bucket is one ZREVRANGEBYLEX away. A full
-- bucket gives its upper half to a new one; an emptied one leaves the directory.
-- An index key of the wrong type is left alone (logged by Redis): the index never stops
-- a delivery.
local INDEX_BUCKET, INDEX_SPLIT = 128, 64

local function wrong_type(key, reply)
  if type(reply) == 'table' and reply['err'] then
    redis.log(redis.LOG_WARNING, 'backfill index: ' .. key .. ': ' .. reply['err'])
    return true
  end
  return false
end

-- The bound of the bucket that holds (or would hold) entry: '' when no bound is lower.
local function bucket_bound(app, entry)
  local dir = directory_key(app)
  return redis.call('ZREVRANGEBYLEX', dir, '[' .. entry, '-', 'LIMIT', 0, 1)[1] or ''
end

-- The bound after bound (false at the end).
local function bound_after(app, bound)
  local dir = directory_key(app)
  return redis.call('ZRANGEBYLEX', dir, '(' .. bound, '+', 'LIMIT', 0, 1)[1] or false
end

-- Enter entry in the app's index (the directory must be a sorted set or absent).
local function index_add(app, entry)
  local bound = bucket_bound(app, entry)
  local key = bucket_key(app, bound)
  local count = redis.pcall('ZCARD', key)
  if wrong_type(key, count) then
    return
  end
  if count >= INDEX_BUCKET then  -- full: its upper half starts a bucket of its own
    local upper = redis.call('ZRANGE', key, INDEX_SPLIT, -1)
    redis.call('ZREMRANGEBYRANK', key, INDEX_SPLIT, -1)
    local moved = {}
    for _, member in ipairs(upper) do
      moved[#moved + 1] = 0
      moved[#moved + 1] = member
    end
    local new_key = bucket_key(app, upper[1])
    if wrong_type(new_key, redis.pcall('ZADD', new_key, unpack(moved))) then
      redis.call('ZADD', key, unpack(moved))  -- put back: this bucket stays large
    else
      redis.call('ZADD', directory_key(app), 0, upper[1])
      bound = bucket_bound(app, entry)
      key = bucket_key(app, bound)
    end
  elseif count == 0 then
    redis.call('ZADD', directory_key(app), 0, bound)
  end
  redis.call('ZADD', key, 0, entry)
end

-- Forget the app's index when nothing is left in it.
local function index_forget_if_empty(app)
  if redis.call('EXISTS', directory_key(app), legacy_index_key(app)) == 0 then
    redis.call('ZREM', KEY.index_apps, app)
    redis.call('HDEL', KEY.index_hand, app)
    if redis.call('EXISTS', KEY.index_apps) == 0 then
      redis.call('DEL', KEY.index_hand)  -- and the app swept last in turn
    end
  end
end

-- Remove members from the bucket at bound (an emptied bucket leaves the directory).
local function bucket_drop(app, bound, members)
  local key = bucket_key(app, bound)
  if #members > 0 and not wrong_type(key, redis.pcall('ZREM', key, unpack(members)))
      and redis.call('EXISTS', key) == 0 then
    redis.call('ZREM', directory_key(app), bound)
  end
end

-- Take entry out of the app's index (a purge).
local function index_drop(app, entry)
  bucket_drop(app, bucket_bound(app, entry), {entry})
  if redis.call('TYPE', legacy_index_key(app))['ok'] == 'zset' then
    redis.call('ZREM', legacy_index_key(app), entry)
  end
  index_forget_if_empty(app)
end

-- Whether an index entry points at a delivery that is gone (no hash, no delivered marker).
local function entry_gone(member)
  local at = string.find(member, '\0', 1, true)
  local id = at and string.sub(member, at + 1) or ''
  return not string.match(id, '^[%w_-]+$')
    or redis.call('EXISTS', delivery_key(id), marker_key(id)) == 0
end

-- Move up to m entries of an index kept before buckets (one sorted set) into buckets.
local function index_move_legacy(app, m)
  local old = legacy_index_key(app)
  if redis.call('TYPE', old)['ok'] ~= 'zset' then
    return 0
  end
  local rows = redis.call('ZRANGE', old, 0, m - 1)
  for _, member in ipairs(rows) do
    if not entry_gone(member) then
      index_add(app, member)
    end
  end
  if #rows > 0 then
    redis.call('ZREM', old, unpack(rows))
  end
  return #rows
end

-- Check up to m entries of an app's index from where its last sweep stopped (the hand,
-- wrapping round) and drop those whose delivery is gone.
local function index_sweep(app, m)
  local dir = directory_key(app)
  if redis.call('TYPE', dir)['ok'] ~= 'zset' then
    if redis.call('EXISTS', dir) == 0 and index_move_legacy(app, m) == 0 then
      index_forget_if_empty(app)
    end
    return
  end
  m = m - index_move_legacy(app, m)
  local hand = redis.call('HGET', KEY.index_hand, app)
  local bound = hand and bucket_bound(app, hand)
    or redis.call('ZRANGEBYLEX', dir, '-', '+', 'LIMIT', 0, 1)[1]
  local checked = 0
  while bound and checked < m do
    local key = bucket_key(app, bound)
    local rows = redis.pcall('ZRANGEBYLEX', key, hand and '(' .. hand or '-', '+',
      'LIMIT', 0, m - checked)
    if wrong_type(key, rows) then
      rows = {}
    end
    local gone = {}
    for _, member in ipairs(rows) do
      if entry_gone(member) then
        gone[#gone + 1] = member
      end
    end
    local next_bound = bound_after(app, bound)
    bucket_drop(app, bound, gone)
    checked = checked + #rows
    hand = rows[#rows] or hand
    if checked < m then
      bound, hand = next_bound, false
    end
  end
  if bound and hand then
    redis.call('HSET', KEY.index_hand, app, hand)
  else
    redis.call('HDEL', KEY.index_hand, app)  -- the end: the next sweep starts from the first
  end
  index_forget_if_empty(app)
end
