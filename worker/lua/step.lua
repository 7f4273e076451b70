-- One round trip per batch of deliveries: record the attempts just made (if any), then
-- claim the next due deliveries (if asked). lib.lua is prepended.
-- ARGV: 1 n (attempts to record)  2 k (deliveries to claim, 0 for none)
--   then n times 14 values: id, token, outcome (or 'release': claimed, never sent),
--     attempt document (JSON), counted (1/0), retry_ms, marker_ttl_s, keep_s, pause_ms,
--     pause reason, hold_ms, history (attempt documents kept), lane (l/b), callers
--   then the claim's: lease_ms (also the probe's), rate per s, burst, max_wait_ms,
--     max_attempts, prefer (l/b: the lane looked at first), pause_ms, gap_ms (how much
--     later each next delivery of the batch may start: the worker sends them in turn, and
--     gives the rest back as soon as one attempt is slow)
--   last: the key prefix
-- Returns {recorded, status, claims, events}: recorded is {verdict, first pause} per
-- attempt; status is why the claims stopped ('idle', 'paused', 'probing', 'throttled',
-- 'again', 'full', 'none') and the ms to wait when paused or throttled; each claim is {id,
-- token, attempt, app_id, msgid, number, time, replay, wait_ms, lane, callers}; events are
-- the deliveries dead-lettered or dropped on the way: {kind, id, detail, app_id, msgid,
-- number, time, attempts}. A claimed delivery's lease covers its place in the batch: the
-- i-th (from 0) is leased for one attempt lease plus i gaps.
-- Every argument is checked before the first write.
local n, k = num(ARGV[1], 0, 64), num(ARGV[2], 0, 64)
local W = 14
local outcomes = {delivered = true, duplicate = true, retry = true, dead = true, paused = true,
  release = true}
local c = 3 + (n or 0) * W
local lease_ms, rate, burst = num(ARGV[c], 1, 864e5), num(ARGV[c + 1], 0, 1e6),
  num(ARGV[c + 2], 1, 1e6)
local max_wait, max_attempts = num(ARGV[c + 3], 0, 36e5), num(ARGV[c + 4], 1, 1000)
local pause_ms, gap_ms = num(ARGV[c + 6], 1, 864e5), num(ARGV[c + 7], 0, 864e5)
local ok = n and k and n == math.floor(n) and k == math.floor(k) and #ARGV == c + 8 and gap_ms and lease_ms and rate and burst and max_wait
  and max_attempts and pause_ms and (ARGV[c + 5] == 'l' or ARGV[c + 5] == 'b')
for i = 0, (ok and n or 0) - 1 do
  local a = 3 + i * W
  ok = ok and ARGV[a] ~= '' and outcomes[ARGV[a + 2]] and (ARGV[a + 4] == '0' or ARGV[a + 4] == '1')
    and string.len(ARGV[a + 3]) <= 65536 and num(ARGV[a + 5], 0, 1e11) and num(ARGV[a + 6], 1, 1e9)
    and num(ARGV[a + 7], 0, 1e9) and num(ARGV[a + 8], 1, 864e5) and num(ARGV[a + 10], 0, 864e5)
    and num(ARGV[a + 11], 1, 10000) and (ARGV[a + 12] == 'l' or ARGV[a + 12] == 'b')
    and not string.find(ARGV[a + 13], '|', 1, true)
end
if not ok then
  return redis.error_reply('step: bad argument')
end
local now = now_ms()

-- What recording the batch leaves for one call each at the end: lane entries to remove,
-- keys to delete, whether the probe flags go.
local unlane, gone, clear_probe, keep_probe = {l = {}, b = {}}, {}, false, false

-- Record one attempt (the 14 values from ARGV[a]) and move its delivery on.
local function finish(a)
  local id, token, outcome = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local retry_ms, marker_ttl, keep = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]),
    tonumber(ARGV[a + 7])
  local pause_for, hold_ms, history = tonumber(ARGV[a + 8]), tonumber(ARGV[a + 10]),
    tonumber(ARGV[a + 11])
  local key, lane = delivery_key(id), lane_key(ARGV[a + 12])
  if outcome == 'delivered' or outcome == 'duplicate' then
    -- whoever's claim it was, the provider has it: what idempotent enqueue needs for the
    -- dedupe window is that it was delivered, when, and who may read it
    local marker = tostring(now)
    if ARGV[a + 13] ~= '' then
      marker = marker .. '|' .. ARGV[a + 13]
    end
    redis.call('SET', P .. 'k:' .. id, marker, 'EX', marker_ttl)
    unlane[ARGV[a + 12]][#unlane[ARGV[a + 12]] + 1] = id
    clear_probe = true  -- any answer but "account blocked" proves the account works
    if keep > 0 and redis.call('EXISTS', key) == 1 then
      redis.call('RPUSH', attempts_key(id), ARGV[a + 3])
      redis.call('LTRIM', attempts_key(id), -history, -1)
      redis.call('HSET', key, 's', 'd', 'y', now, 'l', 0)
      redis.call('EXPIRE', key, keep)
      redis.call('EXPIRE', attempts_key(id), keep)
    else
      gone[#gone + 1] = key
      gone[#gone + 1] = attempts_key(id)
    end
    return 'delivered', 0
  end
  local h = redis.pcall('HMGET', key, 'k', 'c', 'a', 's')
  if h['err'] or not h[4] or not counter(h[2]) then
    return 'missing', 0  -- gone, or corrupt since its claim: the next claim deals with it
  end
  if h[1] ~= token then
    if outcome ~= 'release' then
      redis.call('RPUSH', attempts_key(id), ARGV[a + 3])  -- kept in the history only
      redis.call('LTRIM', attempts_key(id), -history, -1)
    end
    return 'stale', 0
  end
  local attempts = tonumber(h[2]) or 0
  if ARGV[a + 4] == '0' then
    attempts = attempts - 1
  end
  if outcome == 'release' then
    -- claimed in a batch, never sent (the worker is stopping): due again now, uncounted
    redis.call('HSET', key, 'u', now, 'l', 0, 'c', attempts)
    redis.call('ZADD', lane, now, id)
    return 'released', 0
  end
  redis.call('RPUSH', attempts_key(id), ARGV[a + 3])
  redis.call('LTRIM', attempts_key(id), -history, -1)
  if hold_ms > 0 then
    -- "too frequent": no worker sends before now + hold
    local until_ = now + hold_ms
    if (tonumber(redis.call('GET', RATE)) or 0) < until_ then
      redis.call('SET', RATE, tostring(until_), 'PX', math.ceil(hold_ms) + 1000)
    end
  end
  if outcome ~= 'paused' then
    clear_probe = true
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
  keep_probe = true  -- this batch ends in a pause: its probe flag stays
  local first = redis.call('SET', PAUSED, ARGV[a + 9], 'NX', 'PX', math.floor(pause_for))
  redis.call('SET', PROBE, '1')
  redis.call('DEL', PROBE_LOCK)
  local resume = now + math.max(redis.call('PTTL', PAUSED), 0)
  redis.call('HSET', key, 'u', resume, 'l', 0, 'c', attempts)
  redis.call('ZADD', lane, resume, id)
  return 'paused', first and 1 or 0
end

local events = {}
local function drop(kind, id, detail, h)
  local attempts = '0'
  if h and h[4] and counter(h[4]) then
    attempts = h[4]
  end
  events[#events + 1] = {kind, id, detail, h and h[6] or '', h and h[7] or '', h and h[8] or '',
    h and h[9] or '', attempts}
end

local function inspect(lane, id)
  -- the delivery's fields when it may be claimed now, else nil (it was dealt with)
  local key = delivery_key(id)
  local h = redis.pcall('HMGET', key, 's', 'u', 'l', 'c', 'k', 'a', 'm', 'n', 't', 'r', 'i')
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
  -- what the claim reads must be what the claim can use (plain numbers, known states)
  local field = nil
  local u, l, c, k = tonumber(h[2]), tonumber(h[3] or 0), tonumber(h[4] or 0), tonumber(h[5] or 0)
  if h[1] ~= 'p' and h[1] ~= 'x' and h[1] ~= 'd' then field = 'state'
  elseif not u or u ~= u or u == math.huge or u == -math.huge then field = 'due'
  elseif not l or l ~= l or l == math.huge or l == -math.huge then field = 'lease'
  elseif not c or c < 0 or c > 1e9 or c ~= math.floor(c) then field = 'attempts'
  elseif not k or k < 0 or k > 1e15 or k ~= math.floor(k) then field = 'claims'
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
  local later = math.max(l, u)
  if later > now then
    redis.call('ZADD', lane_key(lane), later, id)  -- its score was behind its hash
    return nil
  end
  local attempts = c
  if attempts >= max_attempts then
    local reason = 'poison record: claimed ' .. attempts .. ' times without a recorded outcome'
    bury(id, lane, h[6], now, reason)
    drop('poison', id, reason, h)
    return nil
  end
  return h
end

-- Claim up to k due deliveries, live lane first (bulk first when asked); why it stopped.
local function claim_batch(claims)
  -- one call for the usual case: no pause, no probe (and the rate clock, read anyway)
  local flags = redis.call('MGET', PAUSED, PROBE, RATE)
  local probing = false
  local want = k
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
    if probing and not redis.call('SET', PROBE_LOCK, '1', 'NX', 'PX', math.floor(lease_ms)) then
      return {'probing'}
    end
    if probing then
      want = 1  -- after a pause one delivery probes the account, alone
    end
  end
  local order = ARGV[c + 5] == 'b' and {'b', 'l'} or {'l', 'b'}
  for _, lane in ipairs(order) do
    local lk = lane_key(lane)
    for _ = 1, 4 do
      if #claims >= want then
        return {'full'}
      end
      local due = redis.call('ZRANGEBYSCORE', lk, '-inf', now, 'LIMIT', 0, want - #claims)
      if #due == 0 then
        break
      end
      local leases = {}
      for _, id in ipairs(due) do
        local h = inspect(lane, id)
        if h then
          local wait = 0
          if rate > 0 or flags[3] then
            wait = rate_wait(RATE, now, rate, burst, max_wait)
          end
          if wait < 0 then
            if #leases > 0 then
              redis.call('ZADD', lk, unpack(leases))
            end
            if probing and #claims == 0 then redis.call('DEL', PROBE_LOCK) end
            return {'throttled', tostring(-wait)}
          end
          local token = (tonumber(h[5]) or 0) + 1
          local attempt = (tonumber(h[4]) or 0) + 1
          local lease = now + wait + lease_ms + gap_ms * #claims
          redis.call('HSET', delivery_key(id), 'k', token, 'c', attempt, 'l', lease)
          leases[#leases + 1] = lease
          leases[#leases + 1] = id
          claims[#claims + 1] = {id, tostring(token), tostring(attempt), h[6], h[7] or '', h[8],
            h[9], h[10] or '0', tostring(wait), lane, h[11] or ''}
        end
      end
      if #leases > 0 then
        redis.call('ZADD', lk, unpack(leases))
      end
      if #events >= 16 then
        return {'again'}
      end
    end
  end
  if probing and #claims == 0 then
    redis.call('DEL', PROBE_LOCK)  -- nothing due to probe with
  end
  return {#claims > 0 and 'full' or 'idle'}
end

local recorded = {}
for i = 0, n - 1 do
  local verdict, first = finish(3 + i * W)
  recorded[#recorded + 1] = {verdict, first}
end
for lane, ids in pairs(unlane) do
  if #ids > 0 then
    redis.call('ZREM', lane_key(lane), unpack(ids))
  end
end
if clear_probe and not keep_probe then
  gone[#gone + 1] = PROBE
  gone[#gone + 1] = PROBE_LOCK
end
if #gone > 0 then
  redis.call('DEL', unpack(gone))
end
local claims = {}
local status = {'none'}
if k > 0 then
  status = claim_batch(claims)
end
return {recorded, status, claims, events}
