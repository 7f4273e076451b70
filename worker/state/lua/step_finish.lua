-- Recording one attempt (finish, below): the parts of step.lua that move a delivery on.
-- lib.lua and step_args.lua come first.

-- Append an attempt document to a delivery's history, keeping the last `history`.
local function remember(id, doc)
  if redis.call('RPUSH', attempts_key(id), doc) > history then
    redis.call('LTRIM', attempts_key(id), -history, -1)
  end
end

-- The provider has the delivery at `a`, whoever's claim it was: what idempotent enqueue
-- needs for the dedupe window is that it was delivered, when, and who may read it.
local function finish_delivered(a, id, key)
  local marker = tostring(now)
  if ARGV[a + EACH.callers] ~= '' then
    marker = marker .. '|' .. ARGV[a + EACH.callers]
  end
  redis.call('SET', marker_key(id), marker, 'EX', marker_ttl)
  unlane[ARGV[a + EACH.lane]][#unlane[ARGV[a + EACH.lane]] + 1] = id
  delivered_n = delivered_n + 1
  clear_probe = true  -- any answer but "account blocked" proves the account works
  if keep > 0 then
    -- kept a while for `status` and operators; a delivery gone since its claim has all
    -- three fields new, and goes again
    local added = redis.pcall('HSET', key, F.state, 'd', F.delivered_at, now, F.lease, 0)
    if added == 3 then
      gone[#gone + 1] = key
    elseif type(added) == 'number' then
      remember(id, ARGV[a + EACH.doc])
      redis.call('EXPIRE', key, keep)
      redis.call('EXPIRE', attempts_key(id), keep)
    end
  else
    gone[#gone + 1] = key
    gone[#gone + 1] = attempts_key(id)
  end
  return 'delivered', 0
end

-- A failure during an outage hold: the outage's, not the record's; its count goes back.
local function finish_held(a, id, key, lane, attempts)
  if ARGV[a + EACH.counted] == '1' then
    attempts = attempts - 1
  end
  remember(id, ARGV[a + EACH.doc])
  redis.call('SET', OUTAGE_LAST, id)
  held_by('o', id)
  local resume = now + hold_probe(ARGV[a + EACH.last_error])
  redis.call('HSET', key, F.due, resume, F.lease, 0, F.attempts, math.max(attempts, 0))
  redis.call('ZADD', lane, resume, id)
  return 'held', 0
end

-- Paused: the account is blocked (or the provider redirects); hold the whole fleet.
local function finish_paused(a, id, key, lane, attempts)
  keep_probe = true  -- this batch ends in a pause: its probe flag stays
  stale_flags = true
  if not flags[1] and not flags[2] then
    note_before()
  end
  held_by('p', id)
  -- probes follow after 1 s, then twice as long each time one is refused, up to pause_ms:
  -- a short block costs seconds, a long one a probe per pause_ms. PROBE keeps the wait and
  -- how many probes were refused ('<ms>|<n>'). Only a refused probe doubles the wait: an
  -- attempt that was in flight when the pause began (or ended) changes nothing.
  local pttl = redis.call('PTTL', PAUSED)
  local first = false
  if pttl <= 0 then
    local was, refused = string.match(flags[2] or '', '^(%d+)|?(%d*)$')
    was, refused = tonumber(was), tonumber(refused) or 0
    if not was then  -- a new pause
      pttl = math.min(1000, pause_ms)
    elseif redis.call('EXISTS', PROBE_LOCK) == 1 then  -- its probe was refused
      pttl, refused = math.min(math.max(was * 2, 1000), pause_ms), refused + 1
    else  -- sent before the pause's wait ended: the probe's turn is now, as it was
      pttl = 0
    end
    if pttl > 0 then
      first = redis.call('SET', PAUSED, ARGV[a + EACH.last_error], 'NX', 'PX', math.floor(pttl))
      redis.call('SET', PROBE, string.format('%d|%d', pttl, refused))
      redis.call('DEL', PROBE_LOCK)
    end
  end
  local resume = now + math.max(pttl, 0)
  redis.call('HSET', key, F.due, resume, F.lease, 0, F.attempts, attempts)
  redis.call('ZADD', lane, resume, id)
  return 'paused', first and 1 or 0
end

-- What a counted answer or failure says of the fleet: a suspect, a probe that failed, a
-- "too frequent" hold on every worker's sends, or an answer that ends a pause.
local function finish_signals(a, id, outcome)
  local evidence, hold_ms = ARGV[a + EACH.evidence], tonumber(ARGV[a + EACH.hold_ms])
  if evidence == 's' then
    suspect('o', id)  -- it failed while the provider answered others: its own trouble
  elseif evidence == 'b' then
    suspect('p', id)  -- blocked or redirected while the provider accepted others: its own
  end
  if flags[5] and evidence ~= '0' and (outcome == 'retry' or outcome == 'dead') then
    hold_probe(ARGV[a + EACH.last_error])  -- a probe that failed, counted (a suspect's): the next waits
  end
  if hold_ms > 0 then
    -- "too frequent": no worker sends before now + hold
    local until_ = now + hold_ms
    if (tonumber(redis.call('GET', RATE)) or 0) < until_ then
      redis.call('SET', RATE, tostring(until_), 'PX', math.ceil(hold_ms) + 1000)
    end
  end
  if evidence == '0' and outcome ~= 'paused' then
    clear_probe = true  -- the provider answered, and not "account blocked"
  end
end

-- Record one attempt (its values from ARGV[a + EACH.id]) and move its delivery on.
local function finish(a)
  local id, token, outcome = ARGV[a + EACH.id], ARGV[a + EACH.token], ARGV[a + EACH.outcome]
  local key, lane = delivery_key(id), lane_key(ARGV[a + EACH.lane])
  if outcome == 'delivered' or outcome == 'duplicate' then
    return finish_delivered(a, id, key)
  end
  local h = redis.pcall('HMGET', key, F.claims, F.attempts, F.app_id, F.state)
  if h['err'] or not h[4] or not counter(h[2]) then
    return 'missing', 0  -- gone, or corrupt since its claim: the next claim deals with it
  end
  if h[1] ~= token then
    if outcome ~= 'release' then
      remember(id, ARGV[a + EACH.doc])  -- kept in the history only
    end
    return 'stale', 0
  end
  local attempts = tonumber(h[2]) or 0
  if ARGV[a + EACH.counted] == '0' then
    attempts = attempts - 1
  end
  if outcome == 'release' then
    -- claimed in a batch, never sent (the worker is stopping): due again now, uncounted
    redis.call('HSET', key, F.due, now, F.lease, 0, F.attempts, attempts)
    redis.call('ZADD', lane, now, id)
    return 'released', 0
  end
  if flags[5] and (ARGV[a + EACH.evidence] == '1' or ARGV[a + EACH.evidence] == 'w') then
    return finish_held(a, id, key, lane, attempts)
  end
  remember(id, ARGV[a + EACH.doc])
  finish_signals(a, id, outcome)
  if outcome == 'retry' then
    local due = now + tonumber(ARGV[a + EACH.retry_ms])
    redis.call('HSET', key, F.due, due, F.lease, 0, F.attempts, attempts)
    redis.call('ZADD', lane, due, id)
    return 'retry', 0
  end
  if outcome == 'dead' then
    redis.call('HSET', key, F.state, 'x', F.dead_at, now, F.lease, 0, F.attempts, attempts)
    redis.call('ZREM', lane, id)
    redis.call('ZADD', KEY.dead, now, id)
    redis.call('ZADD', dead_app_key(h[3] or ''), now, id)
    return 'dead', 0
  end
  return finish_paused(a, id, key, lane, attempts)
end
