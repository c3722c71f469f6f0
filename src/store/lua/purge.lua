-- purge: deletes the record whatever its state. 1 when there was one.
local deleted = redis.call('DEL', record_key)
if deleted == 1 then
  changed('purged')
end
return deleted
