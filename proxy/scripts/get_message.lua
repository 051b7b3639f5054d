-- One message doc from the thread's hash, or from the cold cache of read-through fills.
-- KEYS: messages, cold cache, thread ; ARGV: mid
-- Returns the doc; nil when Redis does not hold the thread (its tombstone may be in
-- PostgreSQL only: the caller checks the thread first) or the message; 'GONE' when Redis
-- holds the thread as deleted.
local deleted = redis.call('HGET', KEYS[3], 'del')
if not deleted then return nil end
if deleted == '1' then return 'GONE' end
return redis.call('HGET', KEYS[1], 'd|' .. ARGV[1]) or redis.call('HGET', KEYS[2], ARGV[1])
