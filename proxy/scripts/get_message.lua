-- One message doc from the thread's hash, or from the cold cache of read-through fills.
-- KEYS: messages, cold cache, thread ; ARGV: mid
-- Returns the doc, nil (not in Redis), or 'GONE' when Redis holds the thread as deleted.
if redis.call('HGET', KEYS[3], 'del') == '1' then return 'GONE' end
return redis.call('HGET', KEYS[1], 'd|' .. ARGV[1]) or redis.call('HGET', KEYS[2], ARGV[1])
