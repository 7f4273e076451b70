-- One round trip per batch of deliveries: record the attempts just made (if any), then
-- claim the next due deliveries (if asked). Its contract (scripts.STEP), lib.lua and the
-- step_*.lua parts are prepended. Arguments, by name:
--   n (attempts to record), k (deliveries to claim, 0 for none), lease_ms (also the
--     probe's), rate per s, burst, max_wait_ms, max_attempts, prefer (l/b: the lane looked
--     at first), pause_ms, gap_ms (how much later each next delivery of the batch may
--     start: the worker sends them in turn, and gives the rest back as soon as one attempt
--     is slow), marker_ttl_s, keep_s (how long a delivered record keeps its hash; 0:
--     compacted at once), history (attempt documents kept), then the outage detector's:
--     failures, distinct deliveries, window_ms, probe cap ms, ramp start (per s, 0 for
--     none), ramp doubling ms, retried (deliveries whose retry failed too), short_ms (a
--     hold or pause no longer than this resumes near the rate before it, not at the
--     ramp's start)
--   then per attempt: id, token, outcome (or 'release': claimed, never sent), attempt
--     document (JSON), counted (1/0), retry_ms, the last error (a pause's reason),
--     hold_ms, lane (l/b), callers, evidence ('1' points at a provider outage, '0' the
--     provider answered, '-' neither, 's' its own, 'w' as '1' with a Retry-After:
--     policy.Evidence)
-- Returns {recorded, status, claims, events}: recorded is {verdict, first pause} per
-- attempt (verdict 'held': a failure during an outage hold, its count given back);
-- status is {why the claims stopped ('idle', 'paused', 'probing', 'throttled', 'again',
-- 'full', 'none'), the ms to wait when paused or throttled (else ''), '1' while the fleet
-- holds for an outage (else '0')}; each claim is {id,
-- token, attempt, app_id, msgid, number, time, replay, wait_ms, lane, callers, suspect}; events are
-- the deliveries dead-lettered or dropped on the way: {kind, id, detail, app_id, msgid,
-- number, time, attempts}, and 'outage' / 'outage_over' {kind, '', JSON detail, ...}.
-- A claimed delivery's lease covers its place in the batch: the
-- i-th (from 0) is leased for one attempt lease plus i gaps.
-- Every argument is checked before the first write.
local n, k = num(ARGV[ARG.n], 0, 64), num(ARGV[ARG.k], 0, 64)
local outcomes = {delivered = true, duplicate = true, retry = true, dead = true, paused = true,
  release = true}
local function arg(name, lo, hi) return num(ARGV[ARG[name]], lo, hi) end
local lease_ms, rate, burst = arg('lease_ms', 1, 864e5), arg('rate', 0, 1e6), arg('burst', 1, 1e6)
local max_wait, max_attempts = arg('max_wait_ms', 0, 36e5), arg('max_attempts', 1, 1000)
local pause_ms, gap_ms = arg('pause_ms', 1, 864e5), arg('gap_ms', 0, 864e5)
local marker_ttl, keep, history = arg('marker_ttl_s', 1, 1e9), arg('keep_s', 0, 1e9),
  arg('history', 1, 10000)
local o_failures, o_distinct = arg('o_failures', 1, 1000), arg('o_distinct', 1, 1000)
local o_window, o_cap = arg('o_window_ms', 1, 864e5), arg('o_cap_ms', 1, 864e5)
local ramp_start, ramp_ms = arg('ramp_start', 0, 1e6), arg('ramp_ms', 1, 864e5)
local o_retried, short_ms = arg('o_retried', 0, 1000), arg('short_ms', 0, 864e5)
local prefer = ARGV[ARG.prefer]
local ok = n and k and n == math.floor(n) and k == math.floor(k) and #ARGV == FIRST + n * WIDTH
  and gap_ms
  and marker_ttl and keep and history
  and lease_ms and rate and burst and max_wait and max_attempts and pause_ms
  and (prefer == 'l' or prefer == 'b') and o_failures and o_distinct and o_window
  and o_cap and ramp_start and ramp_ms and o_retried and short_ms
for i = 0, (ok and n or 0) - 1 do
  local a = FIRST + i * WIDTH
  ok = ok and ARGV[a + EACH.id] ~= '' and outcomes[ARGV[a + EACH.outcome]] and (ARGV[a + EACH.counted] == '0' or ARGV[a + EACH.counted] == '1')
    and string.len(ARGV[a + EACH.doc]) <= 65536 and num(ARGV[a + EACH.retry_ms], 0, 1e11)
    and num(ARGV[a + EACH.hold_ms], 0, 864e5) and (ARGV[a + EACH.lane] == 'l' or ARGV[a + EACH.lane] == 'b')
    and not string.find(ARGV[a + EACH.callers], '|', 1, true)
    and (ARGV[a + EACH.evidence] == '1' or ARGV[a + EACH.evidence] == '0' or ARGV[a + EACH.evidence] == '-'
      or ARGV[a + EACH.evidence] == 's' or ARGV[a + EACH.evidence] == 'w')
end
if not ok then
  return redis.error_reply('step: bad argument')
end
local now = now_ms()
-- The fleet's flags, read once: pause, probe, rate clock, ramp, outage. A write below
-- that changes one marks them stale, and the claim reads them again.
local PAUSED, PROBE, PROBE_LOCK, RATE, OUTAGE = KEY.paused, KEY.probe, KEY.probe_lock, KEY.rate,
  KEY.outage
local OUTAGE_SEEN, RAMP, OUTAGE_LAST, HELD_BY, BEFORE = KEY.outage_seen, KEY.ramp,
  KEY.outage_last, KEY.held_by, KEY.before
local flags = redis.call('MGET', PAUSED, PROBE, RATE, RAMP, OUTAGE)
local stale_flags = false
local events = {}

-- What recording the batch leaves for one call each at the end: lane entries to remove,
-- keys to delete, whether the probe flags go.
local unlane, gone, clear_probe, keep_probe = {l = {}, b = {}}, {}, false, false
local delivered_n = 0  -- deliveries recorded by this step, for the 10 s counters
local answered, settled = {}, false  -- deliveries the provider answered; suspects marked

-- Append an attempt document to a delivery's history, keeping the last `history`.
local function remember(id, doc)
  if redis.call('RPUSH', attempts_key(id), doc) > history then
    redis.call('LTRIM', attempts_key(id), -history, -1)
  end
end

-- The fleet's delivery rate just before a hold or pause begins (from the 10 s counters):
-- after a short one, sends resume near it rather than at the ramp's start.
local function note_before()
  local span = math.floor(now / 10000)
  local got = redis.call('MGET', counted_key(span), counted_key(span - 1))
  local count = (tonumber(got[1]) or 0) + (tonumber(got[2]) or 0)
  local rate = count * 1000 / math.max(now - (span - 1) * 10000, 1)
  redis.pcall('SET', BEFORE, string.format('%d|%.3f', now, rate), 'NX', 'PX', 3600000)
end

-- Remember a delivery whose failure began or kept a pause ('p') or hold ('o'): when the
-- provider answers other deliveries, its next such failures are its own (settle()).
local function held_by(kind, id)
  local size = redis.pcall('SCARD', HELD_BY)
  if type(size) == 'number' and size < 1000 then
    redis.call('SADD', HELD_BY, kind .. '|' .. id)
    redis.call('PEXPIRE', HELD_BY, 86400000)
  end
end

-- Hold the fleet for an outage begun at `start` (ms): no claims but one probe, `wait` ms
-- from now (`probes` sent so far); the pause carries the reason every reader shows.
local function hold(start, wait, last_error, probes)
  flags[5] = start .. '|' .. string.format('%d', wait) .. '|' .. (probes or 0)
  redis.call('SET', OUTAGE, flags[5])
  redis.call('SET', PAUSED, 'outage: ' .. last_error, 'PX', wait)
  redis.call('SET', PROBE, string.format('%d', wait))
  redis.call('DEL', PROBE_LOCK)
  keep_probe, stale_flags = true, true
end

-- During an outage hold: the ms until the next probe may go. When the hold's pause has
-- ended, this failure was the probe's: pause again, the wait doubled up to the cap.
local function hold_probe(last_error)
  local pttl = redis.call('PTTL', PAUSED)
  if pttl > 0 then
    return pttl
  end
  local start, wait, probes = string.match(flags[5], '^(%d+)|(%d+)|?(%d*)$')
  wait = math.min(math.max((tonumber(wait) or 1000) * 2, 1000), o_cap)
  hold(start or tostring(now), wait, last_error, tonumber(probes))
  return wait
end

-- Mark a pending delivery the provider did not answer in this step a suspect of `kind`:
-- its failures of that kind are its own from now on (policy.Suspect).
local function suspect(kind, id)
  if answered[id] then
    return
  end
  local h = redis.pcall('HMGET', delivery_key(id), F.state, F.suspect)
  if not h['err'] and h[1] == 'p' and not string.find(h[2] or '', kind, 1, true) then
    redis.call('HSET', delivery_key(id), F.suspect, (h[2] or '') .. kind)
  end
end

-- A pause or hold ended by the provider answering: the deliveries whose failures began or
-- kept it (and did not themselves get an answer) become suspects of that kind, so one
-- record the provider always fails cannot pause or hold the fleet again.
local function settle()
  if settled then
    return
  end
  settled = true
  local members = redis.pcall('SMEMBERS', HELD_BY)
  redis.call('DEL', HELD_BY)
  if type(members) ~= 'table' or members['err'] then
    return
  end
  for _, member in ipairs(members) do
    local kind, id = string.match(member, '^([op])|(.+)$')
    if id then
      suspect(kind, id)
    end
  end
end

-- The provider answered other deliveries: one whose retry failed too since the last answer
-- (it failed twice while others were answered) is suspected of its own trouble ('o').
local function blame_repeaters()
  local seen = redis.pcall('ZRANGE', OUTAGE_SEEN, 0, -1)
  if type(seen) ~= 'table' or seen['err'] then
    return
  end
  local fails = {}
  for _, member in ipairs(seen) do
    local id = string.match(member, '^([^|]*)|')
    if id then
      fails[id] = (fails[id] or 0) + 1
      if fails[id] == 2 then
        suspect('o', id)
      end
    end
  end
end

-- The outage detector, before the batch is recorded: an answer from the provider ends a
-- hold (and clears the failures seen); failures that point at the provider are kept for
-- the window, and enough of them, of enough distinct deliveries, begin a hold. The
-- attempts that showed the outage give their counts back.
local function detect()
  local up, down = false, {}
  for i = 0, n - 1 do
    local a = FIRST + i * WIDTH
    if ARGV[a + EACH.evidence] == '0' then
      up, answered[ARGV[a + EACH.id]] = true, true
    elseif ARGV[a + EACH.evidence] == '1' or ARGV[a + EACH.evidence] == 'w' then
      down[#down + 1] = a
    end
  end
  if up then
    if not flags[5] then
      blame_repeaters()
    end
    redis.call('DEL', OUTAGE_SEEN)
    if flags[5] then
      local start = tonumber(string.match(flags[5], '^(%d+)|')) or now
      redis.call('DEL', OUTAGE)
      local reason = redis.call('GET', PAUSED)
      if reason and string.sub(reason, 1, 7) == 'outage:' then
        redis.call('DEL', PAUSED)
      end
      flags[5], stale_flags = false, true
      settle()
      events[#events + 1] = {'outage_over', '', cjson.encode({duration_ms = now - start}),
        '', '', '', '', '0'}
    end
    return
  end
  if #down == 0 or flags[5] then
    return
  end
  if redis.call('TYPE', OUTAGE_SEEN)['ok'] ~= 'zset' then
    redis.call('DEL', OUTAGE_SEEN)  -- missing, or overwritten by hand: only recent evidence
  end
  local mine = {}
  for _, a in ipairs(down) do
    local member = ARGV[a + EACH.id] .. '|' .. ARGV[a + EACH.token]
    if ARGV[a + EACH.evidence] == 'w' then
      member = member .. '|w'  -- it asked us to wait (Retry-After): never verified at once
    end
    mine[member] = true
    redis.call('ZADD', OUTAGE_SEEN, now, member)
  end
  redis.call('ZREMRANGEBYSCORE', OUTAGE_SEEN, '-inf', now - o_window)
  redis.call('ZREMRANGEBYRANK', OUTAGE_SEEN, 0, -1001)  -- at most the last 1,000 kept
  redis.call('PEXPIRE', OUTAGE_SEEN, math.floor(o_window))
  local seen = redis.call('ZRANGE', OUTAGE_SEEN, 0, -1)
  if #seen < o_failures then
    return
  end
  -- an outage fails retries too: a provider that fails only each record's first try (a
  -- stale keep-alive connection) shows many distinct deliveries but no retry failing
  local fails, distinct, retried = {}, 0, 0
  for _, member in ipairs(seen) do
    local id = string.match(member, '^([^|]*)|')
    if id then
      fails[id] = (fails[id] or 0) + 1
      if fails[id] == 1 then
        distinct = distinct + 1
      elseif fails[id] == 2 then
        retried = retried + 1
      end
    end
  end
  if distinct < o_distinct or retried < o_retried then
    return
  end
  -- the fleet holds: no claims but one probe at a time, the first at once (the failed
  -- retries already showed the outage), then after 1 s, doubling up to the cap
  local wait = 1
  local last_error = ARGV[down[#down] + EACH.last_error]
  note_before()
  hold(tostring(now), wait, last_error, 0)
  redis.call('SET', OUTAGE_LAST, ARGV[down[#down] + EACH.id])
  redis.call('DEL', OUTAGE_SEEN)
  local given_back = {}
  for _, member in ipairs(seen) do
    local id = string.match(member, '^([^|]*)|')
    if id and not mine[member] then
      local h = redis.pcall('HMGET', delivery_key(id), F.state, F.attempts)
      if not h['err'] and h[1] == 'p' and counter(h[2]) and (tonumber(h[2]) or 0) > 0 then
        redis.call('HINCRBY', delivery_key(id), F.attempts, -1)
        given_back[#given_back + 1] = id
      end
    end
  end
  events[#events + 1] = {'outage', '', cjson.encode({failures = #seen, deliveries = distinct,
    window_ms = o_window, probe_ms = wait, last_error = last_error, given_back = given_back}),
    '', '', '', '', '0'}
end

-- Record one attempt (its values from ARGV[a + EACH.id]) and move its delivery on.
local function finish(a)
  local id, token, outcome = ARGV[a + EACH.id], ARGV[a + EACH.token], ARGV[a + EACH.outcome]
  local retry_ms, hold_ms = tonumber(ARGV[a + EACH.retry_ms]), tonumber(ARGV[a + EACH.hold_ms])
  local key, lane = delivery_key(id), lane_key(ARGV[a + EACH.lane])
  if outcome == 'delivered' or outcome == 'duplicate' then
    -- whoever's claim it was, the provider has it: what idempotent enqueue needs for the
    -- dedupe window is that it was delivered, when, and who may read it
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
    -- a failure during an outage hold: the outage's, not the record's; its count goes back
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
  remember(id, ARGV[a + EACH.doc])
  if ARGV[a + EACH.evidence] == 's' then
    suspect('o', id)  -- it failed while the provider answered others: its own trouble
  end
  if flags[5] and ARGV[a + EACH.evidence] ~= '0' and (outcome == 'retry' or outcome == 'dead') then
    hold_probe(ARGV[a + EACH.last_error])  -- a probe that failed, counted (a suspect's): the next waits
  end
  if hold_ms > 0 then
    -- "too frequent": no worker sends before now + hold
    local until_ = now + hold_ms
    if (tonumber(redis.call('GET', RATE)) or 0) < until_ then
      redis.call('SET', RATE, tostring(until_), 'PX', math.ceil(hold_ms) + 1000)
    end
  end
  if ARGV[a + EACH.evidence] == '0' and outcome ~= 'paused' then
    clear_probe = true  -- the provider answered, and not "account blocked"
  end
  if outcome == 'retry' then
    local due = now + retry_ms
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
  -- paused: the account is blocked (or the provider redirects); hold the whole fleet
  keep_probe = true  -- this batch ends in a pause: its probe flag stays
  stale_flags = true
  if not flags[1] and not flags[2] then
    note_before()
  end
  held_by('p', id)
  -- probes follow after 1 s, then twice as long each time one is refused, up to pause_ms:
  -- a short block costs seconds, a long one a probe per pause_ms
  local wait = math.min(math.max((tonumber(flags[2]) or 0) * 2, 1000), pause_ms)
  local first = redis.call('SET', PAUSED, ARGV[a + EACH.last_error], 'NX', 'PX', math.floor(wait))
  redis.call('SET', PROBE, string.format('%d', wait))
  redis.call('DEL', PROBE_LOCK)
  local resume = now + math.max(redis.call('PTTL', PAUSED), 0)
  redis.call('HSET', key, F.due, resume, F.lease, 0, F.attempts, attempts)
  redis.call('ZADD', lane, resume, id)
  return 'paused', first and 1 or 0
end

local function drop(kind, id, detail, h)
  local attempts = '0'
  if h and h[4] and counter(h[4]) then
    attempts = h[4]
  end
  events[#events + 1] = {kind, id, detail, h and h[6] or '', h and h[7] or '', h and h[8] or '',
    h and h[9] or '', attempts}
end

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
  local count = {}
  for _, member in ipairs(seen) do
    local id = string.match(member, '^([^|]*)|')
    if id then
      count[id] = (count[id] or 0) + 1
    end
  end
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
  end
  if probing and #claims == 0 then
    redis.call('DEL', PROBE_LOCK)  -- nothing due to probe with
  end
  return {#claims > 0 and 'full' or 'idle'}
end

-- Outcomes per minute (bf:m:<ms / 60,000>: a hash by verdict, kept an hour; released,
-- stale and missing attempts are not outcomes) and the
-- newest deliveries (bf:done, the newest 10,000 by time): the console's chart and list.
local function note(tally, done)
  local minute = minute_key(math.floor(now / 60000))
  for verdict, count in pairs(tally) do
    -- pcall: a key overwritten with another type is skipped, never fails the step
    redis.pcall('HINCRBY', minute, verdict, count)
  end
  redis.pcall('EXPIRE', minute, 3720)
  if #done > 0 then
    redis.pcall('ZADD', KEY.done, unpack(done))
    redis.pcall('ZREMRANGEBYRANK', KEY.done, 0, -10001)
  end
end

local recorded, tally, done = {}, {}, {}
local charted = {delivered = true, retry = true, dead = true, paused = true, held = true}
if n > 0 then
  detect()
end
for i = 0, n - 1 do
  local verdict, first = finish(FIRST + i * WIDTH)
  recorded[#recorded + 1] = {verdict, first}
  if charted[verdict] then
    tally[verdict] = (tally[verdict] or 0) + 1
  end
  if verdict == 'delivered' then
    done[#done + 1] = now
    done[#done + 1] = ARGV[FIRST + i * WIDTH + EACH.id]
  end
end
if n > 0 then
  note(tally, done)
end
if delivered_n > 0 then
  -- deliveries per 10 s (bf:n:<ms / 10,000>), kept an hour: the console's recent figures
  local counter_key = counted_key(math.floor(now / 10000))
  -- pcall: a counter overwritten with another type is skipped, never fails the step
  if redis.pcall('INCRBY', counter_key, delivered_n) == delivered_n then
    redis.call('EXPIRE', counter_key, 3610)
  end
  -- and per hour (bf:nh:<ms / 3,600,000>), kept as long as the delivered markers: how
  -- many there are is then counted, never scanned for
  local hour_key = counted_hour_key(math.floor(now / 3600000))
  if redis.pcall('INCRBY', hour_key, delivered_n) == delivered_n then
    redis.call('EXPIRE', hour_key, marker_ttl + 3600)
  end
end
for lane, ids in pairs(unlane) do
  if #ids > 0 then
    redis.call('ZREM', lane_key(lane), unpack(ids))
  end
end
if clear_probe and not keep_probe and flags[2] then
  -- an answer proved the provider and the account work: the pause or hold is over, and
  -- sends ramp up from here: from the rate before it when it was short
  settle()
  gone[#gone + 1] = PROBE
  gone[#gone + 1] = PROBE_LOCK
  if ramp_start > 0 then
    local before = redis.pcall('GET', BEFORE)
    local began, was = string.match(type(before) == 'string' and before or '', '^(%d+)|(.+)$')
    local from = ramp_start
    began, was = tonumber(began), tonumber(was)
    if began and finite(was) and now - began <= short_ms and was > from then
      from = was
    end
    redis.call('SET', RAMP, string.format('%d|%.3f', now, from), 'PX', math.floor(ramp_ms * 9))
  end
  gone[#gone + 1] = BEFORE
  stale_flags = true
end
if #gone > 0 then
  redis.call('DEL', unpack(gone))
end
local claims = {}
local status = {'none'}
if k > 0 then
  status = claim_batch(claims)
end
return {recorded, {status[1], status[2] or '', flags[5] and '1' or '0'}, claims, events}
