-- The step script's arguments, read by name and all checked before the first write, and
-- the state its parts share (step.lua describes the arguments). lib.lua comes first.
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
      or ARGV[a + EACH.evidence] == 's' or ARGV[a + EACH.evidence] == 'w' or ARGV[a + EACH.evidence] == 'b')
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
local ended_probes = nil  -- the probes an outage hold ended by this step had sent
