-- claim: ARGV = token, fingerprint, fields, lease_ms, window_ms, credential digest.
-- Free (no record, or a released one): a new in-flight record led by the token, {'leader'}. Taken: the record. An in-flight record whose
-- lease ran out (its leader died or stalled mid-call; the server may have acted) is turned 'unknown' for
-- the window first, and its waiters are woken.
local now = now_ms()
local record = read_record(now)
-- A released record: nothing was created; it stays only for its waiters, and the new claim leads.
if not record or record[2] == 'released' then
  return create(ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), now, ARGV[6])
end
if record[2] == 'unknown' and redis.call('HGET', record_key, 'state') == 'inflight' then
  redis.call('HSET', record_key, 'state', 'unknown', 'settled', redis.call('HGET', record_key, 'lease_until'))
  redis.call('PEXPIRE', record_key, int(tonumber(ARGV[5])))
  changed('unknown')
end
return record
