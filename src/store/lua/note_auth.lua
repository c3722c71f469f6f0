-- note_auth: KEYS[1] = runonce:auth:{<client>}, ARGV = within_ms. The client called /authApp now (Redis's
-- clock): the 5.1.0 client's refresh before its re-send, seen by every replica for within_ms.
redis.call('SET', record_key, int(now_ms()), 'PX', ARGV[1])
return 1
