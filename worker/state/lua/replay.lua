-- Bring dead deliveries back with a fresh attempt budget, same delivery_id, in the bulk
-- lane (a replay never delays live records). Its contract and lib.lua are prepended:
-- delivery ids (scripts.REPLAY). Returns the ids replayed (the others were
-- not dead). Every id is checked before the first write.
for i = FIRST, #ARGV - 1 do
  if not string.match(ARGV[i], '^[%w_-]+$') then
    return redis.error_reply('replay: bad argument')
  end
end
local now = now_ms()
local done = {}
for i = FIRST, #ARGV - 1 do
  local id = ARGV[i + EACH.id]
  local key = delivery_key(id)
  if redis.call('TYPE', key)['ok'] == 'hash' and redis.call('HGET', key, F.state) == 'x' then
    local app = redis.call('HGET', key, F.app_id) or ''
    redis.call('HSET', key, F.state, 'p', F.attempts, 0, F.due, now, F.lease, 0, F.replay, 1,
      F.lane, 'b')
    redis.call('HDEL', key, F.dead_at, F.suspect)  -- a replay is a fresh start: no suspicion kept
    redis.call('ZADD', lane_key('b'), now, id)
    redis.call('ZREM', KEY.dead, id)
    redis.call('ZREM', dead_app_key(app), id)
    done[#done + 1] = id
  end
end
return done
