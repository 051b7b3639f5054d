-- Read-through: put a live state entry loaded from PostgreSQL into Redis, unless present or
-- the load is stale (its fence token is gone: the entry was released since).
-- KEYS: state, fence ; ARGV: doc, version, expires_at_ms ('' = never), ttl_ms, now_ms, token
-- Returns 1 filled, 0 present, -1 stale.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('SISMEMBER', KEYS[2], ARGV[6]) == 0 then return -1 end
redis.call('HSET', KEYS[1], 'doc', ARGV[1], 'v', ARGV[2], 'del', '0', 'x', ARGV[3], 'pend', '0')
local ttl = tonumber(ARGV[4])
if ARGV[3] ~= '' then ttl = math.min(ttl, tonumber(ARGV[3]) - tonumber(ARGV[5])) end
redis.call('PEXPIRE', KEYS[1], math.max(ttl, 1))
return 1
