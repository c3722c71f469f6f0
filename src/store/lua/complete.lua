-- complete: ARGV = token, window_ms, status, head, body, delivered ('1' when the answer goes to the client's
-- connection right after, so the usual call needs no mark_delivered). The leader's definite answer, kept for the
-- window from now. 1, or 0 when the token no longer leads. Already done by this token (a client retry of this
-- script after a lost reply) also answers 1, changing nothing but the delivery.
local now = now_ms()
-- The fencing check of `leads`, and the fields this script needs besides, in one read.
local r = redis.call('HMGET', record_key, 'state', 'owner', 'lease_until', 'waiters')
if r[1] == 'done' and r[2] == ARGV[1] then
  if ARGV[6] == '1' then
    redis.call('HSET', record_key, 'delivered', '1')
  end
  return 1
end
if not (r[1] == 'inflight' and r[2] == ARGV[1] and (tonumber(r[3]) or 0) >= now) then
  return 0
end
redis.call('HSET', record_key, 'state', 'done', 'status', ARGV[3], 'head', ARGV[4], 'body', ARGV[5],
  'delivered', ARGV[6])
redis.call('PEXPIRE', record_key, int(tonumber(ARGV[2])))
-- Only when a waiter counted itself in, as changed_if_waited: `waiters` was read above, in this same call.
if r[4] then
  changed('done')
end
return 1
