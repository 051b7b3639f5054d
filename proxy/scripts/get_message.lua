-- One message doc from the thread's hash, or from the cold cache of read-through fills.
-- KEYS: messages, cold cache ; ARGV: mid
return redis.call('HGET', KEYS[1], 'd|' .. ARGV[1]) or redis.call('HGET', KEYS[2], ARGV[1])
