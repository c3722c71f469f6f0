-- complete: ARGV = token, window_ms, status, head, body. The leader's definite answer, kept for the window
-- from now, not yet delivered. 1, or 0 when the token no longer leads.
local now = now_ms()
if not leads(ARGV[1], now) then
  return 0
end
redis.call('HSET', record_key, 'state', 'done', 'status', ARGV[3], 'head', ARGV[4], 'body', ARGV[5],
  'delivered', '0')
redis.call('PEXPIRE', record_key, int(tonumber(ARGV[2])))
changed('done')
return 1
