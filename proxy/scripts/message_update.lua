-- Replace a message's doc (edit or tombstone) if its version is the expected one, and log it.
-- KEYS: thread, messages, window, log, cold cache, recent ids, overlay,
--       dead letters (erase only: its copies of the message's entries go too),
--       changes (the changes feed: the message moves to its new cseq)
-- ARGV: tid, mid, expected version, doc (complete, with the new version, without cseq: the
--       script puts the change's cseq right after the seq, which comes first), new version,
--       event, channel, ts_ms, seq,
--       erase: '' (edit, delete), else the consumer group whose acknowledgement releases
--       unflushed counts ('pg'): every earlier log entry and dead letter of the message is
--       deleted first (they hold its content; this entry supersedes them),
--       then the erase's read-ahead (proxy/hot/erasure.py; see erase below)
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

--#include lib/erase.lua
local erasing = ARGV[10] ~= nil and ARGV[10] ~= ''
if erasing and redis.call('EXISTS', KEYS[4]) == 1 then
  erase(KEYS[4], KEYS[8], KEYS[1], KEYS[2], ARGV[10], function(f)
    if f['k'] == 'm' and f['id'] == mid and f['tid'] == ARGV[1] then return mid end
  end, 11)
end

redis.call('HSET', KEYS[2], 'd|' .. mid, doc, 'm|' .. mid, ARGV[5] .. ',' .. rest)
redis.call('HINCRBY', KEYS[2], 'p|' .. mid, 1)
redis.call('HDEL', KEYS[5], mid)
if not redis.call('ZSCORE', KEYS[3], mid) then redis.call('ZADD', KEYS[7], ARGV[9], mid) end
redis.call('HINCRBY', KEYS[1], 'pend', 1)
for _, i in ipairs({1, 2, 3, 6, 7, 9}) do redis.call('PERSIST', KEYS[i]) end
redis.call('ZADD', KEYS[9], cs, mid)
redis.call('XADD', KEYS[4], '*', 'k', 'm', 'id', mid, 'tid', ARGV[1], 'v', ARGV[5],
  'e', ARGV[6], 'ts', ARGV[8], 'd', doc, 'f', fp)
-- An erase is published as the delete it is to subscribers (the tombstone, no content).
local published = erasing and 'message.deleted' or ARGV[6]
redis.call('PUBLISH', ARGV[7], '{"type":"' .. published .. '","thread_id":"' .. ARGV[1]
  .. '","seq":' .. ARGV[9] .. ',"ts":' .. ARGV[8] .. ',"cseq":' .. cs .. ',"message":' .. doc
  .. '}')
return {'OK', ARGV[5], fp, doc}
