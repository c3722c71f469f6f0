-- mark_unknown: ARGV = token, window_ms. The outcome cannot be known: kept as 'unknown' for the window
-- from now. 1, or 0 when the token no longer leads.
if not leads(ARGV[1], now_ms()) then
  return 0
end
redis.call('HSET', record_key, 'state', 'unknown')
redis.call('PEXPIRE', record_key, int(tonumber(ARGV[2])))
changed_if_waited('unknown')
return 1
