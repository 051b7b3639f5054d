-- Append a message: assign the thread's next seq, store it, index it, log it, atomically.
-- KEYS: thread, messages, window, log, load fence
-- ARGV: tid, mid, body (JSON object starting after seq), fingerprint, channel, ts_ms,
--       checked ('*': a new generated id, in no store; a load fence token: PostgreSQL said
--       the id is not there, read under that token; '': not checked)
-- Returns {status, doc}: CREATED, DUP (same body, original doc or ''), CONFLICT, MISS (thread
-- not in Redis), GONE (thread deleted), CHECK (the id may be in PostgreSQL only, and the
-- check is missing or stale: the thread was released since, e.g. a peer's copy trimmed).
local th = redis.call('HMGET', KEYS[1], 'seq', 'del', 'fl')
if not th[1] then return {'MISS'} end
if th[2] == '1' then return {'GONE'} end
local mid = ARGV[2]
local meta = redis.call('HGET', KEYS[2], 'm|' .. mid)
if meta then
  local fp = string.match(meta, ',(%w+)$')
  if fp ~= ARGV[4] then return {'CONFLICT'} end
  return {'DUP', redis.call('HGET', KEYS[2], 'd|' .. mid) or ''}
end
if th[3] ~= '0' and ARGV[7] ~= '*'
  and (ARGV[7] == '' or redis.call('SISMEMBER', KEYS[5], ARGV[7]) == 0)
then
  return {'CHECK'}
end

local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local s = string.format('%d', seq)
local doc = '{"seq":' .. s .. ',' .. string.sub(ARGV[3], 2)
redis.call('HSET', KEYS[2], 'd|' .. mid, doc, 'm|' .. mid, '1,' .. ARGV[4], 'p|' .. mid, '1')
redis.call('ZADD', KEYS[3], seq, mid)
redis.call('HINCRBY', KEYS[1], 'pend', 1)
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[2])
redis.call('PERSIST', KEYS[3])
redis.call('XADD', KEYS[4], '*', 'k', 'm', 'id', mid, 'tid', ARGV[1], 'v', '1',
  'e', 'message.created', 'ts', ARGV[6], 'd', doc, 'f', ARGV[4])
redis.call('PUBLISH', ARGV[5], '{"type":"message.created","thread_id":"' .. ARGV[1]
  .. '","seq":' .. s .. ',"ts":' .. ARGV[6] .. ',"message":' .. doc .. '}')
return {'CREATED', doc}
