-- resolve: ARGV = owner, keep_ms, status, head, body (an empty status: nothing was created). The server said what the
-- unknown call created by `owner` created: its instance (the record turns 'done', not delivered, for the rest
-- of its window) or nothing (it turns 'released', for the waiters, and the next claim leads). 1, or 0 when
-- the record is no longer that unknown one (another resolver, or a purge, came first).
local now = now_ms()
if not unknown_by(ARGV[1], now) then
  return 0
end
-- The verdict ends the turn to ask (ask_turn).
redis.call('HDEL', record_key, 'asking_until')
if ARGV[3] == '' then
  redis.call('HSET', record_key, 'state', 'released', 'settled', int(now))
  redis.call('HDEL', record_key, 'status', 'head', 'body')
  redis.call('PEXPIRE', record_key, int(tonumber(ARGV[2])))
  changed_if_waited('released')
  return 1
end
redis.call('HSET', record_key, 'state', 'done', 'status', ARGV[3], 'head', ARGV[4], 'body', ARGV[5],
  'delivered', '0', 'settled', int(now))
changed_if_waited('done')
return 1
