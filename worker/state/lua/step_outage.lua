-- The outage detector and the pause's bookkeeping: holds, probes, suspects (detect, at the
-- end). lib.lua and step_args.lua come first.
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
  if redis.call('EXISTS', PROBE_LOCK) == 0 then
    -- no probe in flight: an attempt sent before the wait ended (say, in flight when the
    -- hold began): due with the probe, whose turn it is, and the wait stays as it was
    return 0
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

-- The failures seen (members '<id>|<claim>', '|w' after one that asked us to wait),
-- counted by delivery.
local function failures_by_delivery(seen)
  local fails = {}
  for _, member in ipairs(seen) do
    local id = string.match(member, '^([^|]*)|')
    if id then
      fails[id] = (fails[id] or 0) + 1
    end
  end
  return fails
end

-- The provider answered other deliveries: one whose retry failed too since the last answer
-- (it failed twice while others were answered) is suspected of its own trouble ('o').
local function blame_repeaters()
  local seen = redis.pcall('ZRANGE', OUTAGE_SEEN, 0, -1)
  if type(seen) ~= 'table' or seen['err'] then
    return
  end
  for id, fails in pairs(failures_by_delivery(seen)) do
    if fails >= 2 then
      suspect('o', id)
    end
  end
end

-- The provider answered: a hold is over (and the failures seen are cleared).
local function outage_over()
  if not flags[5] then
    blame_repeaters()
  end
  redis.call('DEL', OUTAGE_SEEN)
  if flags[5] then
    local start = tonumber(string.match(flags[5], '^(%d+)|')) or now
    ended_probes = tonumber(string.match(flags[5], '^%d+|%d+|(%d+)$')) or 0
    redis.call('DEL', OUTAGE, OUTAGE_LAST)
    local reason = redis.call('GET', PAUSED)
    if reason and string.sub(reason, 1, 7) == 'outage:' then
      redis.call('DEL', PAUSED)
    end
    flags[5], stale_flags = false, true
    settle()
    events[#events + 1] = {'outage_over', '', cjson.encode({duration_ms = now - start}),
      '', '', '', '', '0'}
  end
end

-- Keep this batch's failures that point at the provider (the items at `down`) for the
-- window; the failures seen, and this batch's own.
local function keep_evidence(down)
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
  return redis.call('ZRANGE', OUTAGE_SEEN, 0, -1), mine
end

-- Of the failures seen: how many distinct deliveries, how many of them failed twice.
local function tally_seen(seen)
  -- an outage fails retries too: a provider that fails only each record's first try (a
  -- stale keep-alive connection) shows many distinct deliveries but no retry failing
  local distinct, retried = 0, 0
  for _, fails in pairs(failures_by_delivery(seen)) do
    distinct = distinct + 1
    if fails >= 2 then
      retried = retried + 1
    end
  end
  return distinct, retried
end

-- Begin a hold on the failures seen (this batch's are `mine`): counts given back.
local function begin_hold(down, seen, mine, distinct)
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
    outage_over()
    return
  end
  if #down == 0 or flags[5] then
    return
  end
  local seen, mine = keep_evidence(down)
  if #seen < o_failures then
    return
  end
  local distinct, retried = tally_seen(seen)
  if distinct < o_distinct or retried < o_retried then
    return
  end
  begin_hold(down, seen, mine, distinct)
end
