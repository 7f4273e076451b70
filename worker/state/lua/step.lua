-- One round trip per batch of deliveries: record the attempts just made (if any), then
-- claim the next due deliveries (if asked). Its contract (scripts.STEP), lib.lua and its
-- parts are prepended, in order: step_args.lua (the arguments, checked), step_outage.lua
-- (the outage detector, pauses, suspects), step_finish.lua (recording an attempt),
-- step_claim.lua (claiming). Arguments, by name:
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
--     provider answered, '-' neither, 's' its own, 'b' a block or redirect of its own
--     (the provider accepted others meanwhile), 'w' as '1' with a Retry-After:
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
-- Outcomes per minute (bf:m:<ms / 60,000>: a hash by verdict, kept an hour; released,
-- stale and missing attempts are not outcomes) and the
-- newest deliveries (bf:done, a list of the newest 10,000, newest first): the console's
-- chart and list.
local function note(tally, done)
  local minute = minute_key(math.floor(now / 60000))
  for verdict, count in pairs(tally) do
    -- pcall: a key overwritten with another type is skipped, never fails the step
    redis.pcall('HINCRBY', minute, verdict, count)
  end
  redis.pcall('EXPIRE', minute, 3720)
  if #done > 0 then
    if type(redis.pcall('LPUSH', KEY.done, unpack(done))) == 'table' then
      redis.call('DEL', KEY.done)  -- another type (a sorted set in earlier versions): anew
      redis.call('LPUSH', KEY.done, unpack(done))
    end
    redis.call('LTRIM', KEY.done, 0, 9999)
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
  -- its first probe was answered: a false alarm (one record's redirect or drop), so no
  -- ramp at all; else from the rate before a short one, or from ramp_start
  local false_alarm = ended_probes and ended_probes <= 1
  if ended_probes == nil then  -- a pause: no probe of it was refused
    local wait, refused = string.match(flags[2], '^(%d+)|?(%d*)$')
    if refused and refused ~= '' then
      false_alarm = refused == '0'
    else  -- a flag an earlier version wrote: by the first pause's wait
      false_alarm = tonumber(wait) == math.min(1000, pause_ms)
    end
  end
  if false_alarm then
    gone[#gone + 1] = RAMP
  elseif ramp_start > 0 then
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
