-- Delete dead deliveries for good; ids that are not dead are left alone. lib.lua is
-- prepended. ARGV: delivery ids..., then the key prefix. Returns how many were purged.
for i = 1, #ARGV - 1 do
  if not string.match(ARGV[i], '^[%w_-]+$') then
    return redis.error_reply('purge: bad argument')
  end
end
local purged = 0
for i = 1, #ARGV - 1 do
  local id = ARGV[i]
  local key = delivery_key(id)
  if redis.call('TYPE', key)['ok'] == 'hash' and redis.call('HGET', key, 's') == 'x' then
    local app = redis.call('HGET', key, 'a') or ''
    redis.call('DEL', key, attempts_key(id))
    redis.call('ZREM', DEAD, id)
    redis.call('ZREM', dead_app_key(app), id)
    purged = purged + 1
  elseif redis.call('EXISTS', key) == 0 then
    redis.call('ZREM', DEAD, id)  -- a dead letter whose delivery is gone: drop the entry
  end
end
return purged
