-- complete: ARGV = token, window_ms, status, head, body. The leader's definite answer, kept for the window
-- from now, not yet delivered. 1, or 0 when the token no longer leads. Already done by this token (a client
-- retry of this script after a lost reply) also answers 1, changing nothing.
local now = now_ms()
if not leads(ARGV[1], now) then
  local r = redis.call('HMGET', record_key, 'state', 'owner')
  if r[1] == 'done' and r[2] == ARGV[1] then
    return 1
  end
  return 0
end
redis.call('HSET', record_key, 'state', 'done', 'status', ARGV[3], 'head', ARGV[4], 'body', ARGV[5],
  'delivered', '0')
redis.call('PEXPIRE', record_key, int(tonumber(ARGV[2])))
changed_if_waited('done')
return 1
