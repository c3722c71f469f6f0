-- auth_since: KEYS[1] = runonce:auth:{<client>}. Milliseconds since the client's last noted /authApp call,
-- or nil when none is remembered.
local at = tonumber(redis.call('GET', record_key))
if not at then
  return nil
end
local since = now_ms() - at
if since < 0 then
  since = 0
end
return since
