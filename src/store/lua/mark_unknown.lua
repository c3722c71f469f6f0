-- mark_unknown: ARGV = token, window_ms, status, head, body (the answer that came; an empty status: none). The
-- outcome cannot be known: kept as 'unknown' for the window from now, with the answer for the duplicates
-- that waited. 1, or 0 when the token no longer leads.
local now = now_ms()
if not leads(ARGV[1], now) then
  return 0
end
redis.call('HSET', record_key, 'state', 'unknown', 'settled', int(now))
keep_answer(3)
redis.call('PEXPIRE', record_key, int(tonumber(ARGV[2])))
changed_if_waited('unknown')
return 1
