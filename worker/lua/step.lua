-- One round trip per delivery: record the outcome of the attempt just made (if any), then
-- claim the next due delivery (if asked). lib.lua is prepended.
-- ARGV:  1 finish? (1/0)  2 claim? (1/0)
--   finish: 3 id  4 token  5 outcome  6 attempt document (JSON)  7 counted (1/0)
--           8 retry_ms  9 marker_ttl_s  10 keep_s  11 pause_ms  12 pause reason  13 hold_ms
--           14 history (attempt documents kept)  15 its lane (l/b)
--   claim:  16 lease_ms (also the probe's lease)  17 rate per s  18 burst  19 max_wait_ms
--           20 max_attempts  21 prefer (l/b: the lane looked at first)
--   22 key prefix
-- Returns {finish verdict, first pause (1/0), claim, events}; claim is {'claimed', id,
-- token, attempt, app_id, msgid, number, time, replay, wait_ms, lane} or why not
-- ('idle', 'paused', 'probing', 'throttled', 'again'); events are the deliveries it
-- dead-lettered or dropped on the way: {kind, id, detail, app_id, msgid, number, time, n}.
-- Every argument is checked before the first write.
local finishing, claiming = ARGV[1] == '1', ARGV[2] == '1'
local outcomes = {delivered = true, duplicate = true, retry = true, dead = true, paused = true}
local retry_ms, marker_ttl, keep, pause_ms, hold_ms, history
local lease_ms, rate, burst, max_wait, max_attempts, probe_ms
local ok = #ARGV == 22 and (finishing or ARGV[1] == '0') and (claiming or ARGV[2] == '0')
-- only the half in use is read (and checked): a step that only claims ignores 3..14
if ok and finishing then
  retry_ms, marker_ttl, keep = num(ARGV[8], 0, 1e11), num(ARGV[9], 1, 1e9), num(ARGV[10], 0, 1e9)
  pause_ms, hold_ms, history = num(ARGV[11], 1, 864e5), num(ARGV[13], 0, 864e5),
    num(ARGV[14], 1, 10000)
  ok = outcomes[ARGV[5]] and (ARGV[7] == '0' or ARGV[7] == '1') and ARGV[3] ~= ''
    and string.len(ARGV[6]) <= 65536 and (ARGV[15] == 'l' or ARGV[15] == 'b')
    and retry_ms and marker_ttl and keep and pause_ms and hold_ms and history
end
if ok and claiming then
  pause_ms = num(ARGV[11], 1, 864e5)
  lease_ms, rate, burst = num(ARGV[16], 1, 864e5), num(ARGV[17], 0, 1e6), num(ARGV[18], 1, 1e6)
  max_wait, max_attempts = num(ARGV[19], 0, 36e5), num(ARGV[20], 1, 1000)
  probe_ms = lease_ms
  ok = pause_ms and lease_ms and rate and burst and max_wait and max_attempts
    and (ARGV[21] == 'l' or ARGV[21] == 'b')
end
if not ok then
  return redis.error_reply('step: bad argument')
end
local now = now_ms()

local function finish()
  local id, token, outcome = ARGV[3], ARGV[4], ARGV[5]
  local key = delivery_key(id)
  local h = redis.pcall('HMGET', key, 'k', 'c', 'a', 'q', 'i', 's')
  if h['err'] or not h[6] or not counter(h[2]) then
    return 'missing', 0  -- gone, or corrupt since its claim: the next claim deals with it
  end
  if hold_ms > 0 then
    -- "too frequent": no worker sends before now + hold
    local until_ = now + hold_ms
    if (tonumber(redis.call('GET', RATE)) or 0) < until_ then
      redis.call('SET', RATE, tostring(until_), 'PX', math.ceil(hold_ms) + 1000)
    end
  end
  local delivered = outcome == 'delivered' or outcome == 'duplicate'
  local lane = lane_key(ARGV[15])  -- where its claim found it
  if delivered then  -- whoever's claim it was: the provider has it
    -- what idempotent enqueue needs for the dedupe window: that it was delivered, when
    local marker = tostring(now)
    if h[5] then
      marker = marker .. '|' .. h[5]
    end
    redis.call('SET', P .. 'k:' .. id, marker, 'EX', marker_ttl)
    redis.call('ZREM', lane, id)
    if keep > 0 then
      redis.call('RPUSH', attempts_key(id), ARGV[6])
      redis.call('LTRIM', attempts_key(id), -history, -1)
      redis.call('HSET', key, 's', 'd', 'y', now, 'l', 0)
      redis.call('EXPIRE', key, keep)
      redis.call('EXPIRE', attempts_key(id), keep)
      redis.call('DEL', PROBE, PROBE_LOCK)
    else
      -- any answer but "account blocked" proves the account works: the probe flags go too
      redis.call('DEL', key, attempts_key(id), PROBE, PROBE_LOCK)
    end
    return 'delivered', 0
  end
  redis.call('RPUSH', attempts_key(id), ARGV[6])
  redis.call('LTRIM', attempts_key(id), -history, -1)
  if outcome ~= 'paused' then
    redis.call('DEL', PROBE, PROBE_LOCK)
  end
  if h[1] ~= token then
    return 'stale', 0  -- a newer claim owns it now; this attempt stays in the history only
  end
  local attempts = tonumber(h[2]) or 0
  if ARGV[7] == '0' then
    attempts = attempts - 1
  end
  if outcome == 'retry' then
    local due = now + retry_ms
    redis.call('HSET', key, 'u', due, 'l', 0, 'c', attempts)
    redis.call('ZADD', lane, due, id)
    return 'retry', 0
  end
  if outcome == 'dead' then
    redis.call('HSET', key, 's', 'x', 'z', now, 'l', 0, 'c', attempts)
    redis.call('ZREM', lane, id)
    redis.call('ZADD', DEAD, now, id)
    redis.call('ZADD', dead_app_key(h[3] or ''), now, id)
    return 'dead', 0
  end
  -- paused: the account is blocked (or the provider redirects); hold the whole fleet
  local first = redis.call('SET', PAUSED, ARGV[12], 'NX', 'PX', math.floor(pause_ms))
  redis.call('SET', PROBE, '1')
  redis.call('DEL', PROBE_LOCK)
  local resume = now + math.max(redis.call('PTTL', PAUSED), 0)
  redis.call('HSET', key, 'u', resume, 'l', 0, 'c', attempts)
  redis.call('ZADD', lane, resume, id)
  return 'paused', first and 1 or 0
end

local events = {}
local function drop(kind, id, detail, h)
  events[#events + 1] = {kind, id, detail, h and h[6] or '', h and h[7] or '', h and h[8] or '',
    h and h[9] or '', h and tostring(h[4] or '0') or '0'}
end

local function inspect(lane, id)
  -- the delivery's fields when it may be claimed now, else nil (it was dealt with)
  local key = delivery_key(id)
  local h = redis.pcall('HMGET', key, 's', 'u', 'l', 'c', 'k', 'a', 'm', 'n', 't', 'r')
  if h['err'] then
    local kind = redis.call('TYPE', key)['ok']
    redis.call('RENAME', key, key .. ':corrupt')
    local reason = 'corrupt state: type (' .. kind .. ', kept as ' .. key .. ':corrupt)'
    bury(id, lane, nil, now, reason)
    drop('corrupt', id, reason, nil)
    return nil
  end
  if not (h[1] or h[2] or h[6] or h[8]) and redis.call('EXISTS', key) == 0 then
    redis.call('ZREM', lane_key(lane), id)  -- an orphan: its delivery is gone
    drop('orphan', id, 'removed from the schedule', nil)
    return nil
  end
  local field = nil
  if h[1] ~= 'p' and h[1] ~= 'x' and h[1] ~= 'd' then field = 'state'
  elseif not finite(tonumber(h[2])) then field = 'due'
  elseif h[3] and not finite(tonumber(h[3])) then field = 'lease'
  elseif not counter(h[4]) then field = 'attempts'
  elseif not counter(h[5]) then field = 'claims'
  elseif not h[6] then field = 'app_id'
  elseif not h[8] then field = 'number'
  elseif not h[9] then field = 'time'
  end
  if field then
    local reason = 'corrupt state: ' .. field
    bury(id, lane, h[6], now, reason)
    drop('corrupt', id, reason, h)
    return nil
  end
  if h[1] ~= 'p' then
    redis.call('ZREM', lane_key(lane), id)  -- dead or delivered: not for a lane
    return nil
  end
  local later = math.max(tonumber(h[3]) or 0, tonumber(h[2]))
  if later > now then
    redis.call('ZADD', lane_key(lane), later, id)  -- its score was behind its hash
    return nil
  end
  local attempts = tonumber(h[4]) or 0
  if attempts >= max_attempts then
    local reason = 'poison record: claimed ' .. attempts .. ' times without a recorded outcome'
    bury(id, lane, h[6], now, reason)
    drop('poison', id, reason, h)
    return nil
  end
  return h
end

local function claim_next()
  -- one call for the usual case: no pause, no probe (and the rate clock, read anyway)
  local flags = redis.call('MGET', PAUSED, PROBE, RATE)
  local probing = false
  if flags[1] or flags[2] then
    local pttl = redis.call('PTTL', PAUSED)
    if pttl == -1 then
      -- a pause always has a TTL; one without (a manual SET) is given the configured one
      redis.call('PEXPIRE', PAUSED, math.floor(pause_ms))
      pttl = pause_ms
    end
    if pttl > 0 then
      return {'paused', tostring(pttl)}
    end
    probing = flags[2] ~= false
    if probing and not redis.call('SET', PROBE_LOCK, '1', 'NX', 'PX', math.floor(probe_ms)) then
      return {'probing'}
    end
  end
  local order = ARGV[21] == 'b' and {'b', 'l'} or {'l', 'b'}
  for _, lane in ipairs(order) do
    for _ = 1, 16 do
      local due = redis.call('ZRANGEBYSCORE', lane_key(lane), '-inf', now, 'LIMIT', 0, 1)
      if #due == 0 then
        break
      end
      local id = due[1]
      local h = inspect(lane, id)
      if h then
        local wait = 0
        if rate > 0 or flags[3] then
          wait = rate_wait(RATE, now, rate, burst, max_wait)
        end
        if wait < 0 then
          if probing then redis.call('DEL', PROBE_LOCK) end
          return {'throttled', tostring(-wait)}
        end
        local token = (tonumber(h[5]) or 0) + 1
        local attempt = (tonumber(h[4]) or 0) + 1
        local lease = now + wait + lease_ms
        redis.call('HSET', delivery_key(id), 'k', token, 'c', attempt, 'l', lease)
        redis.call('ZADD', lane_key(lane), lease, id)
        return {'claimed', id, tostring(token), tostring(attempt), h[6], h[7] or '', h[8], h[9],
          h[10] or '0', tostring(wait), lane}
      end
    end
    if #events >= 16 then
      return {'again'}
    end
  end
  if probing then
    redis.call('DEL', PROBE_LOCK)  -- nothing due to probe with
  end
  return {'idle'}
end

local verdict, first = '', 0
if finishing then
  verdict, first = finish()
end
local claim = {'none'}
if claiming then
  claim = claim_next()
end
return {verdict, first, claim, events}
