-- Recovery from write-through (proxy.failover): what Redis may still hold of a message or a
-- thread erased through PostgreSQL while it was down goes, before write-behind resumes —
-- its log entries (of every group, written-through ones for ClickHouse too) and dead letters,
-- and its cached docs. No entry is added here (the erase event goes to ClickHouse alone), so
-- the unflushed counts the removed entries held are given back, and the entity is left clean
-- for the reconciler to drop (it was written through: behind, whatever its counters say).
-- KEYS: thread, messages, log, dead letters, cold cache, overlay
-- ARGV: tid, mid ('' = the whole thread and its messages), the thread's tombstone as
--       PostgreSQL holds it ('' for a message), the consumer group whose acknowledgement
--       releases unflushed counts ('pg'), then the read-ahead (proxy/hot/erasure.py)
-- Returns the docs removed.
local tid, mid = ARGV[1], ARGV[2]

--#include lib/erase.lua
if redis.call('EXISTS', KEYS[3]) == 1 then
  erase(KEYS[3], KEYS[4], KEYS[1], KEYS[2], ARGV[4], function(f)
    if f['k'] == 'm' and f['tid'] == tid and (mid == '' or f['id'] == mid) then
      return f['id']
    end
    if mid == '' and f['k'] == 't' and f['id'] == tid then return '' end
  end, 5)
end

if mid ~= '' then
  redis.call('ZREM', KEYS[6], mid)
  return redis.call('HDEL', KEYS[2], 'd|' .. mid) + redis.call('HDEL', KEYS[5], mid)
end
local dropped = drop_docs(KEYS[2])
-- The cached thread doc holds its title and metadata: PostgreSQL's tombstone replaces it,
-- deleted as it is there (no append is taken into it meanwhile).
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'doc', ARGV[3], 'del', '1')
end
return dropped + redis.call('DEL', KEYS[5], KEYS[6])
