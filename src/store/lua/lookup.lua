-- lookup: {owner, lookup} of the record, or false when it keeps no lookup. Changes nothing.
local r = redis.call('HMGET', record_key, 'owner', 'lookup')
if not r[2] then
  return false
end
return {r[1] or '', r[2]}
