-- takeover: ARGV = previous_owner, token, fingerprint, fields, lease_ms, window_ms, credential digest.
-- Only a 'done' record created by previous_owner whose answer was delivered (or no record) is replaced by
-- a new claim; anything else comes back as it is.
local now = now_ms()
local record = read_record(now)
if record and record[2] ~= 'released'
    and not (record[2] == 'done' and record[3] == ARGV[1] and record[10] == '1') then
  return record
end
return create(ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), now, ARGV[7])
