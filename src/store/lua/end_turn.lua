-- end_turn: ARGV = owner. The asker left the unknown record created by `owner` unknown: the turn is free, and
-- when it ended is noted (see ask_turn's gap); the waiters are woken. 1, or 0 when the record is no longer
-- that unknown one.
local now = now_ms()
if not unknown_by(ARGV[1], now) then
  return 0
end
redis.call('HDEL', record_key, 'asking_until')
redis.call('HSET', record_key, 'asked', int(now))
changed_if_waited('asked')
return 1
