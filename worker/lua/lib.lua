-- Shared by every script (prepended): checks, the clock, the rate limit, dead-lettering.
-- Field names of a delivery hash (short: they are stored once per delivery):
--   a app_id, m msgid, n number, t time      the record
--   s state (p pending, x dead)              q lane (l live, b bulk)
--   u due (ms)  l lease until (ms)           c attempts counted  k claims (the claim token)
--   w created (ms)  z dead at (ms)           r 1 after a replay  i callers (intake tokens)
--   y delivered at (ms)                     g suspect: 'p' its account-blocked answers and
--                                            'o' its outage-like failures are its own (a
--                                            pause or hold it kept was ended by others)
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

-- The key names, from the prefix the store passes as the last argument of every script.
local P = ARGV[#ARGV]
local function delivery_key(id) return P .. 'd:' .. id end
local function attempts_key(id) return P .. 'a:' .. id end
local function lane_key(lane) return P .. (lane == 'b' and 'q:bulk' or 'q:live') end
local DEAD, PAUSED, PROBE, PROBE_LOCK, RATE = P .. 'dead', P .. 'paused', P .. 'probe',
  P .. 'probe:lock', P .. 'rate'
local OUTAGE, OUTAGE_SEEN, RAMP = P .. 'outage', P .. 'outage:seen', P .. 'ramp'
local OUTAGE_LAST, HELD_BY, BEFORE = P .. 'outage:last', P .. 'held:by', P .. 'before'
local function dead_app_key(app) return P .. 'dead:app:' .. app end
-- The lookup index (keys.py, lookup.py): one app's deliveries as '<msgid>\0<id>', the apps
-- indexed, and where the enqueue's sweep of each app stopped.
local function index_key(app) return P .. 'x:' .. app end
local INDEX_APPS, INDEX_HAND = P .. 'xa', P .. 'xh'

-- Move a delivery to the dead letters with the reason as its last attempt document.
local function bury(id, lane, app, now, reason)
  local key = delivery_key(id)
  if redis.call('TYPE', key)['ok'] == 'hash' then
    redis.call('HSET', key, 's', 'x', 'z', now, 'l', 0)
  end
  redis.call('RPUSH', attempts_key(id), cjson.encode({o = 'dead', at = now, e = reason}))
  redis.call('ZREM', lane_key('l'), id)
  redis.call('ZREM', lane_key('b'), id)
  redis.call('ZADD', DEAD, now, id)
  if app and app ~= '' then
    redis.call('ZADD', dead_app_key(app), now, id)
  end
end
