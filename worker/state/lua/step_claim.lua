-- Claiming the next due deliveries (claim_batch, below): which may go, in what order, at
-- what rate. lib.lua, step_args.lua, step_outage.lua and step_finish.lua come first.
-- An event for a delivery dead-lettered or dropped on the way (see step.lua).
local function drop(kind, id, detail, h)
  local attempts = '0'
  if h and h[4] and counter(h[4]) then
    attempts = h[4]
  end
  events[#events + 1] = {kind, id, detail, h and h[6] or '', h and h[7] or '', h and h[8] or '',
    h and h[9] or '', attempts}
end

-- A due delivery checked before its claim.
local function inspect(lane, id, any_due)
  -- the delivery's fields when it may be claimed now (`any_due`: whenever it is due, as
  -- long as no attempt holds it), else nil (it was dealt with)
  local key = delivery_key(id)
  local h = redis.pcall('HMGET', key, F.state, F.due, F.lease, F.attempts, F.claims, F.app_id,
    F.msgid, F.number, F.time, F.replay, F.callers, F.suspect)
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
  local later = any_due and l or math.max(l, u)
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

-- The send rate now: the configured one, or during the ramp after a hold or pause the
-- ramp's (it starts at the rate before a short hold, else ramp_start, and doubles every
-- ramp_ms until past 256 times ramp_start); {rate, burst, max wait}.
local function send_limits()
  local value = flags[4]
  local from, start = nil, ramp_start
  if value then
    local t, r = string.match(value, '^([^|]+)|?(.*)$')
    from, start = tonumber(t), tonumber(r) or ramp_start
    if not (finite(from) and from <= now and finite(start) and start >= ramp_start) then
      redis.call('DEL', RAMP)  -- not what we wrote (set by hand): no ramp, not one for good
      from = nil
    end
  end
  if from and ramp_start > 0 then
    local ramped = start * 2 ^ math.min(math.floor((now - from) / ramp_ms), 30)
    if ramped < ramp_start * 256 and (rate == 0 or ramped < rate) then
      -- slots reserved at most one doubling ahead, so the next doubling takes effect
      return ramped, 1, math.min(max_wait, ramp_ms / 2)
    end
  end
  return rate, burst, max_wait
end

-- Which delivery probes an outage hold, in turn: the one that failed last (a provider that
-- fails only first tries answers its retry), then the earliest due of another app (so a
-- record the provider always fails cannot keep the hold). {lane, id, fields} or nil.
local function probe_target()
  local start, wait, probes = string.match(flags[5], '^(%d+)|(%d+)|?(%d*)$')
  probes = (tonumber(probes) or 0) + 1
  if start then
    flags[5] = start .. '|' .. wait .. '|' .. probes
    redis.call('SET', OUTAGE, flags[5])
  end
  local last = redis.pcall('GET', OUTAGE_LAST)
  last = type(last) == 'string' and last or ''
  local last_app = last ~= '' and redis.pcall('HGET', delivery_key(last), F.app_id) or false
  local function retry_last()
    local lane = last ~= '' and redis.pcall('HGET', delivery_key(last), F.lane)
    local h = (lane == 'l' or lane == 'b') and inspect(lane, last, true)
    return h and {lane, last, h}
  end
  local function another()
    for _, lane in ipairs({'l', 'b'}) do
      local pick = nil
      for _, id in ipairs(redis.call('ZRANGEBYSCORE', lane_key(lane), '-inf', now, 'LIMIT', 0, 8)) do
        if id ~= last then
          pick = pick or id
          if redis.pcall('HGET', delivery_key(id), F.app_id) ~= last_app then
            pick = id
            break
          end
        end
      end
      local h = pick and inspect(lane, pick)
      if h then
        return {lane, pick, h}
      end
    end
  end
  if probes % 2 == 1 then
    return retry_last() or another()
  end
  return another() or retry_last()
end

-- A failure that points at the provider, and no answer since: before more first tries,
-- retry (once, at once, counted) the delivery that failed last. The provider failing its
-- retry too is what an outage looks like; answering it, one record's bad luck (a stale
-- connection, say). {lane, id, fields} or nil.
local function verify_target()
  local seen = redis.pcall('ZREVRANGE', OUTAGE_SEEN, 0, 15)
  if type(seen) ~= 'table' or seen['err'] or #seen == 0 then
    return nil
  end
  local count = failures_by_delivery(seen)
  for _, member in ipairs(seen) do
    local id = string.match(member, '^([^|]*)|')
    if id and count[id] == 1 and string.sub(member, -2) ~= '|w' then
      local lane = redis.pcall('HGET', delivery_key(id), F.lane)
      local h = (lane == 'l' or lane == 'b') and inspect(lane, id, true)
      if h then
        return {lane, id, h}
      end
    end
  end
  return nil
end

-- Claim one inspected delivery into `claims` (its lease noted in `leases`); false when
-- the rate limit says not yet (nothing claimed).
local function take(lane, id, h, claims, leases, limits)
  local wait = 0
  if limits[1] > 0 or flags[3] then
    wait = rate_wait(RATE, now, limits[1], limits[2], limits[3])
  end
  if wait < 0 then
    return false, -wait
  end
  local token = (tonumber(h[5]) or 0) + 1
  local attempt = (tonumber(h[4]) or 0) + 1
  local lease = now + wait + lease_ms + gap_ms * #claims
  redis.call('HSET', delivery_key(id), F.claims, token, F.attempts, attempt, F.lease, lease)
  leases[#leases + 1] = lease
  leases[#leases + 1] = id
  claims[#claims + 1] = {id, tostring(token), tostring(attempt), h[6], h[7] or '', h[8],
    h[9], h[10] or '0', tostring(wait), lane, h[11] or '', h[12] or ''}
  return true
end

-- The pause or probe in force: {why no claim} to stop, or (nil, probing).
local function paused()
  if not (flags[1] or flags[2]) then
    return nil, false
  end
  local pttl = redis.call('PTTL', PAUSED)
  if pttl == -1 then
    -- a pause always has a TTL; one without (a manual SET) is given the configured one
    redis.call('PEXPIRE', PAUSED, math.floor(pause_ms))
    pttl = pause_ms
  end
  if pttl > 0 then
    return {'paused', tostring(pttl)}
  end
  local probing = flags[2] ~= false
  if probing and not redis.call('SET', PROBE_LOCK, '1', 'NX', 'PX', math.floor(lease_ms)) then
    return {'probing'}
  end
  return nil, probing
end

-- Claim from one lane until `want` are claimed in all, four rounds at most: why the claims
-- stop, or nil for the next lane.
local function claim_lane(lane, want, claims, limits, probing)
  local lk = lane_key(lane)
  for _ = 1, 4 do
    if #claims >= want then
      return {'full'}
    end
    local due = redis.call('ZRANGEBYSCORE', lk, '-inf', now, 'LIMIT', 0, want - #claims)
    if #due == 0 then
      return nil
    end
    local leases = {}
    for _, id in ipairs(due) do
      local h = inspect(lane, id)
      if h then
        local took, wait = take(lane, id, h, claims, leases, limits)
        if not took then
          if #leases > 0 then
            redis.call('ZADD', lk, unpack(leases))
          end
          if probing and #claims == 0 then redis.call('DEL', PROBE_LOCK) end
          return {'throttled', tostring(wait)}
        end
      end
    end
    if #leases > 0 then
      redis.call('ZADD', lk, unpack(leases))
    end
    if #events >= 16 then
      return {'again'}
    end
  end
  return nil
end

-- Claim up to k due deliveries, live lane first (bulk first when asked); why it stopped.
local function claim_batch(claims)
  if stale_flags then
    flags = redis.call('MGET', PAUSED, PROBE, RATE, RAMP, OUTAGE)
  end
  local stop, probing = paused()
  if stop then
    return stop
  end
  local limits = {send_limits()}
  if probing then
    -- after a pause one delivery probes the account alone; during a hold, the one chosen
    local target = flags[5] and probe_target()
    if target then
      local leases = {}
      local took, wait = take(target[1], target[2], target[3], claims, leases, limits)
      if not took then
        redis.call('DEL', PROBE_LOCK)
        return {'throttled', tostring(wait)}
      end
      redis.call('ZADD', lane_key(target[1]), unpack(leases))
      return {'full'}
    end
  end
  local want = probing and 1 or k
  local target = not probing and o_retried > 0 and verify_target()
  if target then
    local leases = {}
    local took, wait = take(target[1], target[2], target[3], claims, leases, limits)
    if not took then
      return {'throttled', tostring(wait)}
    end
    redis.call('ZADD', lane_key(target[1]), unpack(leases))
  end
  local order = prefer == 'b' and {'b', 'l'} or {'l', 'b'}
  for _, lane in ipairs(order) do
    local stop = claim_lane(lane, want, claims, limits, probing)
    if stop then
      return stop
    end
  end
  if probing and #claims == 0 then
    redis.call('DEL', PROBE_LOCK)  -- nothing due to probe with
  end
  return {#claims > 0 and 'full' or 'idle'}
end
