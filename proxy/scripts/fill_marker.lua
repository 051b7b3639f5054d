-- Read-through: put a user's read marker loaded from PostgreSQL (0: none there) into the
-- thread's markers, unless the load is stale (its fence token is gone: the thread was
-- released since it began). A marker only moves forward, so the higher of the two is kept.
-- KEYS: thread, markers, fence ; ARGV: user id, seq, token, ttl_ms
-- Returns 1 filled (or Redis had a higher one), 0 no thread in Redis, -1 stale.
-- With nothing of the thread unflushed, the markers get the cache TTL (they are all flushed).
local pend = redis.call('HGET', KEYS[1], 'pend')
if not pend then return 0 end
if redis.call('SISMEMBER', KEYS[3], ARGV[3]) == 0 then return -1 end
local cur = redis.call('HGET', KEYS[2], ARGV[1])
if not cur or tonumber(cur) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
if pend == '0' then redis.call('PEXPIRE', KEYS[2], ARGV[4]) end
return 1
