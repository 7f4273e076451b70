-- Delete dead deliveries for good; ids that are not dead are left alone. Its contract and
-- lib.lua are prepended: delivery ids (scripts.PURGE). Returns how many were purged.
-- A purged delivery leaves its app's lookup index too (when the index keys have their types).
for i = FIRST, #ARGV - 1 do
  if not string.match(ARGV[i], '^[%w_-]+$') then
    return redis.error_reply('purge: bad argument')
  end
end
local indexed = true
for key, want in pairs({[KEY.index_apps] = 'zset', [KEY.index_hand] = 'hash'}) do
  local kind = redis.call('TYPE', key)['ok']
  indexed = indexed and (kind == want or kind == 'none')
end
local purged = 0
for i = FIRST, #ARGV - 1 do
  local id = ARGV[i + EACH.id]
  local key = delivery_key(id)
  if redis.call('TYPE', key)['ok'] == 'hash' and redis.call('HGET', key, F.state) == 'x' then
    local record = redis.call('HMGET', key, F.app_id, F.msgid)
    local app = record[1] or ''
    redis.call('DEL', key, attempts_key(id))
    redis.call('ZREM', KEY.dead, id)
    redis.call('ZREM', dead_app_key(app), id)
    local kind = app ~= '' and redis.call('TYPE', directory_key(app))['ok']
    if indexed and (kind == 'zset' or kind == 'none') then  -- none: an earlier version's index
      index_drop(app, (record[2] or '') .. '\0' .. id)
    end
    purged = purged + 1
  elseif redis.call('EXISTS', key) == 0 then
    redis.call('ZREM', KEY.dead, id)  -- a dead letter whose delivery is gone: drop the entry
  end
end
return purged
