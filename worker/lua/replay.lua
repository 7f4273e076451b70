-- Bring dead deliveries back with a fresh attempt budget, same delivery_id, in the bulk
-- lane (a replay never delays live records). lib.lua is prepended.
-- ARGV: delivery ids..., then the key prefix. Returns the ids replayed (the others were
-- not dead). Every id is checked before the first write.
for i = 1, #ARGV - 1 do
  if not string.match(ARGV[i], '^[%w_-]+$') then
    return redis.error_reply('replay: bad argument')
  end
end
local now = now_ms()
local done = {}
for i = 1, #ARGV - 1 do
  local id = ARGV[i]
  local key = delivery_key(id)
  if redis.call('TYPE', key)['ok'] == 'hash' and redis.call('HGET', key, 's') == 'x' then
    local app = redis.call('HGET', key, 'a') or ''
    redis.call('HSET', key, 's', 'p', 'c', 0, 'u', now, 'l', 0, 'r', 1, 'q', 'b')
    redis.call('HDEL', key, 'z', 'g')  -- a replay is a fresh start: no suspicion kept
    redis.call('ZADD', lane_key('b'), now, id)
    redis.call('ZREM', DEAD, id)
    redis.call('ZREM', dead_app_key(app), id)
    done[#done + 1] = id
  end
end
return done
