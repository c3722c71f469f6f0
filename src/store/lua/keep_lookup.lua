-- keep_lookup: ARGV = owner, lookup. Keeps what a resolver looks for (JSON, no token, no parameters) with the
-- unknown record created by `owner`, for an operator's `POST /keys/{key}/resolve`. 1, or 0 when the record is
-- no longer that unknown one. A new claim replaces the whole record, and the lookup with it.
local record = read_record(now_ms())
if not record or record[2] ~= 'unknown' or record[3] ~= ARGV[1] then
  return 0
end
redis.call('HSET', record_key, 'lookup', ARGV[2])
return 1
