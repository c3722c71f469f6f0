-- in_flight: 1 while the record is in flight under a live lease (a waiter keeps waiting), else 0. A waiter
-- asks this after it started listening, so counting it here tells the leader's settling script to publish.
local r = redis.call('HMGET', record_key, 'state', 'lease_until')
if r[1] == 'inflight' and (tonumber(r[2]) or 0) >= now_ms() then
  redis.call('HINCRBY', record_key, 'waiters', 1)
  return 1
end
return 0
