-- Replace a message's doc (edit or tombstone) if its version is the expected one, and log it.
-- KEYS: thread, messages, window, log, cold cache, recent ids, overlay,
--       changes (the changes feed: the message moves to its new cseq)
-- ARGV: tid, mid, expected version, doc (complete, with the new version, without cseq: the
--       script puts the change's cseq right after the seq, which comes first), new version,
--       event, channel, ts_ms, seq
-- A message below the window joins the overlay until its change is flushed: pages read
-- below the window from PostgreSQL show this doc instead.
-- Returns {status, current version, fingerprint, doc}: OK, PRECONDITION, MISS (message not
-- in Redis), GONE.
local th = redis.call('HMGET', KEYS[1], 'seq', 'del')
if not th[1] then return {'MISS'} end
if th[2] == '1' then return {'GONE'} end
local mid = ARGV[2]
local meta = redis.call('HGET', KEYS[2], 'm|' .. mid)
if not meta then return {'MISS'} end
local v, rest = string.match(meta, '^(%d+),(.*)$')
if v ~= ARGV[3] then return {'PRECONDITION', v} end
local fp = string.match(rest, '^(%w+)')
local cs = string.format('%d', redis.call('HINCRBY', KEYS[1], 'cs', 1))  -- the change's cseq
local at = string.find(ARGV[4], ',', 1, true)
local doc = string.sub(ARGV[4], 1, at) .. '"cseq":' .. cs .. ',' .. string.sub(ARGV[4], at + 1)

redis.call('HSET', KEYS[2], 'd|' .. mid, doc, 'm|' .. mid, ARGV[5] .. ',' .. rest)
redis.call('HINCRBY', KEYS[2], 'p|' .. mid, 1)
redis.call('HDEL', KEYS[5], mid)
if not redis.call('ZSCORE', KEYS[3], mid) then redis.call('ZADD', KEYS[7], ARGV[9], mid) end
redis.call('HINCRBY', KEYS[1], 'pend', 1)
for i = 1, 8 do
  if i ~= 4 and i ~= 5 then redis.call('PERSIST', KEYS[i]) end
end
redis.call('ZADD', KEYS[8], cs, mid)
redis.call('XADD', KEYS[4], '*', 'k', 'm', 'id', mid, 'tid', ARGV[1], 'v', ARGV[5],
  'e', ARGV[6], 'ts', ARGV[8], 'd', doc, 'f', fp)
redis.call('PUBLISH', ARGV[7], '{"type":"' .. ARGV[6] .. '","thread_id":"' .. ARGV[1]
  .. '","seq":' .. ARGV[9] .. ',"ts":' .. ARGV[8] .. ',"cseq":' .. cs .. ',"message":' .. doc
  .. '}')
return {'OK', ARGV[5], fp, doc}
