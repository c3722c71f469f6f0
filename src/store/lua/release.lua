-- release: ARGV = token. Nothing was created upstream: the record goes, the next duplicate runs.
-- 1, or 0 when the token no longer leads.
if not leads(ARGV[1], now_ms()) then
  return 0
end
changed_if_waited('released')
redis.call('DEL', record_key)
return 1
