-- Shared by claim.lua (prepended to it): the fleet-wide rate limit, GCRA on one key that
-- holds the theoretical arrival time (TAT, seconds). finish.lua pushes the same key
-- forward when the provider answers "too frequent", which holds every worker.
-- Returns the seconds to wait before sending (the slot is reserved), or -w when the wait
-- w would exceed max_wait (nothing reserved: the caller comes back later).
local function rate_wait(key, now, rate, burst, max_wait)
  local tat = tonumber(redis.call('GET', key)) or now
  if tat ~= tat or tat > now + 86400 or tat < now then
    -- behind us, or not a sane clock (a corrupt value): start from now
    tat = now
  end
  local interval = 0
  if rate > 0 then
    interval = 1 / rate
  end
  local wait = tat - interval * (burst - 1) - now
  if wait < 0 then
    wait = 0
  end
  if wait > max_wait then
    return -wait
  end
  if interval > 0 then
    local new_tat = tat + interval
    redis.call('SET', key, tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
  end
  return wait
end
