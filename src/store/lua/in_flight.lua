-- in_flight: 1 while the record is in flight under a live lease, or an unknown one is being asked about under
-- a live turn (see ask_turn): a waiter keeps waiting; else 0. A waiter asks this after it started listening,
-- so counting it here tells the settling script to publish.
local now = now_ms()
local r = redis.call('HMGET', record_key, 'state', 'lease_until', 'asking_until')
if (r[1] == 'inflight' and (tonumber(r[2]) or 0) >= now) or (tonumber(r[3]) or 0) > now then
  redis.call('HINCRBY', record_key, 'waiters', 1)
  return 1
end
return 0
