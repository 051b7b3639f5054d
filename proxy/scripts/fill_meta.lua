-- Before editing a message that only PostgreSQL holds: give Redis its doc and version so the
-- edit can be checked and applied atomically. Outside the window; kept until the thread is
-- clean. Refused when the load is stale (the thread was released since it began).
-- KEYS: thread, messages, fence ; ARGV: mid, version, fingerprint, doc, token
-- Returns 1 filled (or present), 0 no thread in Redis, -1 stale.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('SISMEMBER', KEYS[3], ARGV[5]) == 0 then return -1 end
if redis.call('HSETNX', KEYS[2], 'm|' .. ARGV[1], ARGV[2] .. ',' .. ARGV[3]) == 1 then
  redis.call('HSET', KEYS[2], 'd|' .. ARGV[1], ARGV[4])
end
return 1
