-- mark_owed: no ARGV. A duplicate was told to retry while the call ran (409): whoever answers it later must
-- replay the answer, even after a client received it. 1, or 0 when there is no record. No PUBLISH: nobody
-- waits for this.
if redis.call('EXISTS', record_key) == 0 then
  return 0
end
redis.call('HSET', record_key, 'owed', '1')
return 1
