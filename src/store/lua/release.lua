-- release: ARGV = token, keep_ms, status, head, body (the leader's answer; an empty status: none). Nothing
-- was created upstream: the record turns 'released' for keep_ms, with the answer, so that the duplicates that
-- waited for the call share it; a claim takes a released record at once. 1, or 0 when the token no longer
-- leads.
if not leads(ARGV[1], now_ms()) then
  return 0
end
redis.call('HSET', record_key, 'state', 'released')
keep_answer(3)
redis.call('PEXPIRE', record_key, int(tonumber(ARGV[2])))
changed_if_waited('released')
return 1
