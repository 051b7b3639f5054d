-- Replace a message's doc (edit or tombstone) if its version is the expected one, and log it.
-- KEYS: thread, messages, window, log, cold cache
-- ARGV: tid, mid, expected version, doc (complete, with the new version), new version,
--       event, channel, ts_ms, seq
-- Returns {status, current version, fingerprint}: OK, PRECONDITION, MISS (message not in
-- Redis), GONE.
local th = redis.call('HMGET', KEYS[1], 'seq', 'del')
if not th[1] then return {'MISS'} end
if th[2] == '1' then return {'GONE'} end
local mid = ARGV[2]
local meta = redis.call('HGET', KEYS[2], 'm|' .. mid)
if not meta then return {'MISS'} end
local v, fp = string.match(meta, '^(%d+),(%w+)$')
if v ~= ARGV[3] then return {'PRECONDITION', v} end

redis.call('HSET', KEYS[2], 'd|' .. mid, ARGV[4], 'm|' .. mid, ARGV[5] .. ',' .. fp)
redis.call('HINCRBY', KEYS[2], 'p|' .. mid, 1)
redis.call('HDEL', KEYS[5], mid)
redis.call('HINCRBY', KEYS[1], 'pend', 1)
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[2])
redis.call('PERSIST', KEYS[3])
redis.call('XADD', KEYS[4], '*', 'k', 'm', 'id', mid, 'tid', ARGV[1], 'v', ARGV[5],
  'e', ARGV[6], 'ts', ARGV[8], 'd', ARGV[4], 'f', fp)
redis.call('PUBLISH', ARGV[7], '{"type":"' .. ARGV[6] .. '","thread_id":"' .. ARGV[1]
  .. '","seq":' .. ARGV[9] .. ',"ts":' .. ARGV[8] .. ',"message":' .. ARGV[4] .. '}')
return {'OK', ARGV[5], fp}
