-- release: ARGV = token. Nothing was created upstream: the record goes, the next duplicate runs.
-- 1, or 0 when the token no longer leads.
if not leads(ARGV[1], now_ms()) then
  return 0
end
redis.call('DEL', record_key)
changed('released')
return 1
