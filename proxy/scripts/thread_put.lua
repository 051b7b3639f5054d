-- Create, update or tombstone a thread, and log the change, atomically.
-- KEYS: thread, messages, window, log, load fence, recent ids, overlay,
--       dead letters, cold cache (erase only),
--       inbox index of the new owner, inbox index of the owner the caller believes it has,
--       changes (the changes feed: the thread, member '', moves to its new cseq)
-- ARGV: body (JSON object without version/created_at), now (JSON string), if_match ('' = none),
--       new (the load fence token under which PostgreSQL said the thread does not exist;
--       '' = not known), op ('put'|'del'), channel, ts_ms, tid,
--       new owner_id (del: the believed one), believed current owner_id,
--       erase (op 'del' only): '' (a tombstone), else the consumer group whose acknowledgement
--       releases unflushed counts ('pg'): every log entry and dead letter of the thread and
--       its messages is deleted and the message docs leave Redis (a deleted thread too),
--       then the erase's read-ahead (proxy/hot/erasure.py; see erase below)
-- Returns {status, version, doc}: MISS when Redis lacks the thread and "new" is not (or no
-- longer: the fence moved) known; OWNER, owner when the thread's owner is not the believed
-- one (its index key was not given). Nothing is written unless every check passes.
local t = KEYS[1]
local cur = redis.call('HMGET', t, 'v', 'c', 'del')
local v, created, deleted = cur[1], cur[2], cur[3] == '1'
if not v then
  if ARGV[4] == '' or redis.call('SISMEMBER', KEYS[5], ARGV[4]) == 0 then return {'MISS'} end
  v, created, deleted = '0', ARGV[2], false
end
local erasing = ARGV[5] == 'del' and ARGV[11] ~= nil and ARGV[11] ~= ''
if deleted and not erasing then return {'GONE', v} end
if v == '0' and ARGV[5] == 'del' then return {'NOTFOUND'} end
if ARGV[3] ~= '' and ARGV[3] ~= v then return {'PRECONDITION', v} end
-- Inbox: the owner the thread has now ('' for a new one; a hash from before `o`: its doc's).
local owner = redis.call('HGET', t, 'o')
if not owner then
  local old = redis.call('HGET', t, 'doc')
  owner = old and cjson.decode(old).owner_id or ''
end
if v ~= '0' and owner ~= ARGV[10] then return {'OWNER', owner} end

--#include lib/erase.lua
if erasing then
  if redis.call('EXISTS', KEYS[4]) == 1 then
    erase(KEYS[4], KEYS[8], t, KEYS[2], ARGV[11], function(f)
      if f['k'] == 'm' and f['tid'] == ARGV[8] then return f['id'] end
      if f['k'] == 't' and f['id'] == ARGV[8] then return '' end
    end, 12)
  end
  drop_docs(KEYS[2])
  -- The overlay and cold cache go; so does the load fence: a read-through that began
  -- before must not fill what it read.
  redis.call('DEL', KEYS[7], KEYS[9], KEYS[5])
end

local nv = redis.call('HINCRBY', t, 'v', 1)
local cs = string.format('%d', redis.call('HINCRBY', t, 'cs', 1))  -- the change's cseq
local doc = '{"version":' .. string.format('%d', nv) .. ',"cseq":' .. cs .. ',"created_at":'
  .. created .. ','
  .. string.sub(ARGV[1], 2)
local event = 'thread.updated'
if erasing then
  event = 'thread.erased'
elseif ARGV[5] == 'del' then
  event = 'thread.deleted'
elseif v == '0' then
  event = 'thread.created'
end
redis.call('HSET', t, 'doc', doc, 'c', created, 'del', ARGV[5] == 'del' and '1' or '0')
redis.call('HSETNX', t, 'seq', '0')
redis.call('HSETNX', t, 'ft', '0')
redis.call('HINCRBY', t, 'pend', 1)
for _, k in ipairs({t, KEYS[2], KEYS[3], KEYS[6], KEYS[7], KEYS[12]}) do
  redis.call('PERSIST', k)
end
-- An erase empties the changes set and raises its floor past the erased history: a position
-- in it is answered with resync (the thread's tombstone is all that is left).
if erasing then
  redis.call('DEL', KEYS[12])
  redis.call('HSET', t, 'cf', cs)
end
redis.call('ZADD', KEYS[12], cs, '')
local seq = redis.call('HGET', t, 'seq')
-- Inbox: last activity (never backwards) in the hash and the owner's index of this shard.
local la = string.format('%d', math.max(tonumber(redis.call('HGET', t, 'la') or '0'),
  tonumber(ARGV[7])))
redis.call('HSET', t, 'la', la, 'o', ARGV[9])
if owner ~= '' and (ARGV[5] == 'del' or owner ~= ARGV[9]) then
  redis.call('ZREM', KEYS[11], ARGV[8])  -- tombstoned, or moved to another owner
end
if ARGV[5] ~= 'del' and ARGV[9] ~= '' then redis.call('ZADD', KEYS[10], la, ARGV[8]) end
redis.call('XADD', KEYS[4], '*', 'k', 't', 'id', ARGV[8], 'v', string.format('%d', nv),
  'e', event, 'ts', ARGV[7], 'd', doc)
-- An erase is published as the delete it is to subscribers (the tombstone, no content).
local published = erasing and 'thread.deleted' or event
redis.call('PUBLISH', ARGV[6], '{"type":"' .. published .. '","thread_id":"' .. ARGV[8]
  .. '","last_seq":' .. seq .. ',"ts":' .. ARGV[7] .. ',"cseq":' .. cs .. ',"thread":' .. doc
  .. '}')
if v == '0' then return {'CREATED', string.format('%d', nv), doc, seq} end
return {'OK', string.format('%d', nv), doc, seq}
