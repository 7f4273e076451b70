-- Delete dead deliveries for good; ids that are not dead are left alone. lib.lua is
-- prepended. ARGV: delivery ids..., then the key prefix. Returns how many were purged.
-- A purged delivery leaves its app's lookup index too (when the index keys have their types).
for i = 1, #ARGV - 1 do
  if not string.match(ARGV[i], '^[%w_-]+$') then
    return redis.error_reply('purge: bad argument')
  end
end
local indexed = true
for key, want in pairs({[INDEX_APPS] = 'zset', [INDEX_HAND] = 'hash'}) do
  local kind = redis.call('TYPE', key)['ok']
  indexed = indexed and (kind == want or kind == 'none')
end
local purged = 0
for i = 1, #ARGV - 1 do
  local id = ARGV[i]
  local key = delivery_key(id)
  if redis.call('TYPE', key)['ok'] == 'hash' and redis.call('HGET', key, 's') == 'x' then
    local record = redis.call('HMGET', key, 'a', 'm')
    local app = record[1] or ''
    redis.call('DEL', key, attempts_key(id))
    redis.call('ZREM', DEAD, id)
    redis.call('ZREM', dead_app_key(app), id)
    local index = index_key(app)
    if indexed and app ~= '' and redis.call('TYPE', index)['ok'] == 'zset' then
      redis.call('ZREM', index, (record[2] or '') .. '\0' .. id)
      if redis.call('EXISTS', index) == 0 then
        redis.call('ZREM', INDEX_APPS, app)
        redis.call('HDEL', INDEX_HAND, app)
        if redis.call('EXISTS', INDEX_APPS) == 0 then
          redis.call('DEL', INDEX_HAND)  -- and the app swept last in turn
        end
      end
    end
    purged = purged + 1
  elseif redis.call('EXISTS', key) == 0 then
    redis.call('ZREM', DEAD, id)  -- a dead letter whose delivery is gone: drop the entry
  end
end
return purged
