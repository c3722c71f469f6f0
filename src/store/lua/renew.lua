-- renew: ARGV = token, lease_ms. 1 when the token still leads (its lease then runs from now), else 0.
-- The record's time to live is raised to at least the lease: it never expires under a live call. Not
-- published: nothing a waiter looks at changes.
local now = now_ms()
local lease = tonumber(ARGV[2])
if not leads(ARGV[1], now) then
  return 0
end
redis.call('HSET', record_key, 'lease_until', int(now + lease))
local ttl = redis.call('PTTL', record_key)
if ttl >= 0 and ttl < lease then
  redis.call('PEXPIRE', record_key, int(lease))
end
return 1
