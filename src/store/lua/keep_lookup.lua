-- keep_lookup: ARGV = owner, lookup. Keeps what a resolver looks for (JSON, no token, no parameters) with the
-- unknown record created by `owner`, for an operator's `POST /keys/{key}/resolve`. 1, or 0 when the record is
-- no longer that unknown one. A new claim replaces the whole record, and the lookup with it.
if not unknown_by(ARGV[1], now_ms()) then
  return 0
end
redis.call('HSET', record_key, 'lookup', ARGV[2])
return 1
