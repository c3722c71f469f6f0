-- note_instance: KEYS[1] = runonce:instance:{<id>}, ARGV = key, within_ms. PowerJob's instance <id> is the
-- answer of the call on <key>: another key's resolution leaves it out, on every replica, for within_ms.
redis.call('SET', record_key, ARGV[1], 'PX', ARGV[2])
return 1
