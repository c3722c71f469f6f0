-- ask_turn: ARGV = owner, lease_ms, gap_ms. The turn to ask PowerJob about the unknown record created by
-- `owner`: one request on every replica at a time. 'yours' (held for lease_ms), 'busy' (another request holds
-- it: the caller is counted as a waiter, so the verdict is published), 'asked' (the last turn ended less than
-- gap_ms ago and left the record unknown), or 'settled' (the record is no longer that unknown one).
local now = now_ms()
if not unknown_by(ARGV[1], now) then
  return 'settled'
end
local r = redis.call('HMGET', record_key, 'asking_until', 'asked')
if (tonumber(r[1]) or 0) > now then
  redis.call('HINCRBY', record_key, 'waiters', 1)
  return 'busy'
end
if r[2] and now - tonumber(r[2]) < tonumber(ARGV[3]) then
  return 'asked'
end
redis.call('HSET', record_key, 'asking_until', int(now + tonumber(ARGV[2])))
return 'yours'
