-- instance_key: KEYS[1] = runonce:instance:{<id>}. The key whose call was answered with instance <id>, or
-- nil when none is remembered.
return redis.call('GET', record_key)
