-- mark_delivered: ARGV = owner. A client received the answer of the 'done' record created by owner in full.
-- 1, or 0 when there is no such record.
local r = redis.call('HMGET', record_key, 'state', 'owner')
if r[1] ~= 'done' or r[2] ~= ARGV[1] then
  return 0
end
redis.call('HSET', record_key, 'delivered', '1')
-- No PUBLISH: nobody waits for a done record to be delivered (waiters wait for in-flight ones to settle), and
-- a message per request would cost every replica's listener.
return 1
