-- Shared by every script (prepended after its contract, scripts.py): checks, the clock,
-- the rate limit, dead-lettering. A delivery hash's fields are F.<name> (keys.FIELD).
local function finite(x)
  return x ~= nil and x == x and x ~= math.huge and x ~= -math.huge
end

-- A number argument within [lo, hi], or nil.
local function num(v, lo, hi)
  local x = tonumber(v)
  if not finite(x) or x < lo or x > hi then
    return nil
  end
  return x
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- What HINCRBY accepts: an absent field or a plain integer.
local function counter(v)
  return v == false or (string.len(v) < 16 and string.match(v, '^%-?%d+$') ~= nil)
end

-- The fleet-wide rate limit: GCRA on one key holding the theoretical arrival time (ms).
-- Returns the ms to wait before sending (the slot is reserved), or -w when the wait w
-- would exceed max_wait (nothing reserved). A "too frequent" answer pushes the same key.
local function rate_wait(key, now, rate, burst, max_wait)
  local tat = tonumber(redis.call('GET', key)) or now
  if not finite(tat) or tat > now + 86400000 or tat < now then
    tat = now  -- behind us, or not a sane clock (a corrupt value): start from now
  end
  local interval = 0
  if rate > 0 then
    interval = 1000 / rate
  end
  local wait = math.max(tat - interval * (burst - 1) - now, 0)
  if wait > max_wait then
    return -wait
  end
  if interval > 0 then
    local new_tat = tat + interval
    redis.call('SET', key, tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1000)
  end
  return wait
end

-- The fixed keys are the script's declared KEYS (KEY.<name>, scripts.py); the keys of one
-- delivery, app or time span are built here from the prefix every script gets last.
local P = ARGV[#ARGV]
local function delivery_key(id) return P .. 'd:' .. id end
local function attempts_key(id) return P .. 'a:' .. id end
local function marker_key(id) return P .. 'k:' .. id end
local function lane_key(lane) return lane == 'b' and KEY.bulk or KEY.live end
local function dead_app_key(app) return P .. 'dead:app:' .. app end
-- The lookup index (keys.py, index.lua): one app's deliveries as '<msgid>\0<id>', in small
-- sorted sets (buckets) from a bound each; the app's directory lists the bounds.
local function directory_key(app) return P .. 'xd:' .. app end
local function bucket_key(app, bound) return P .. 'xb:' .. app .. '\0' .. bound end
local function legacy_index_key(app) return P .. 'x:' .. app end  -- one set, before buckets
local function worker_key(node) return P .. 'worker:' .. node end  -- its heartbeat
-- The counters by time span (keys.py): deliveries per 10 s and per hour, attempts per minute.
local function counted_key(span) return P .. 'n:' .. span end
local function counted_hour_key(hour) return P .. 'nh:' .. hour end
local function minute_key(minute) return P .. 'm:' .. minute end

-- Move a delivery to the dead letters with the reason as its last attempt document.
local function bury(id, lane, app, now, reason)
  local key = delivery_key(id)
  if redis.call('TYPE', key)['ok'] == 'hash' then
    redis.call('HSET', key, F.state, 'x', F.dead_at, now, F.lease, 0)
  end
  redis.call('RPUSH', attempts_key(id), cjson.encode({o = 'dead', at = now, e = reason}))
  redis.call('ZREM', lane_key('l'), id)
  redis.call('ZREM', lane_key('b'), id)
  redis.call('ZADD', KEY.dead, now, id)
  if app and app ~= '' then
    redis.call('ZADD', dead_app_key(app), now, id)
  end
end
