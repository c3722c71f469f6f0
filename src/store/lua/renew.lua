-- renew: ARGV = token, lease_ms. 1 when the token still leads (its lease then runs from now), else 0.
-- The record then lives at least lease + window from now: it never expires under a live call, and reads
-- 'unknown' for a whole window should the leader die. Not published: nothing a waiter looks at changes.
local now = now_ms()
local lease = tonumber(ARGV[2])
if not leads(ARGV[1], now) then
  return 0
end
redis.call('HSET', record_key, 'lease_until', int(now + lease))
local keep = lease + (tonumber(redis.call('HGET', record_key, 'window')) or 0)
local ttl = redis.call('PTTL', record_key)
if ttl >= 0 and ttl < keep then
  redis.call('PEXPIRE', record_key, int(keep))
end
return 1
