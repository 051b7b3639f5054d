-- Create, update or tombstone a thread, and log the change, atomically.
-- KEYS: thread, messages, window, log, load fence, recent ids, overlay,
--       inbox index of the new owner, inbox index of the owner the caller believes it has
-- ARGV: body (JSON object without version/created_at), now (JSON string), if_match ('' = none),
--       new (the load fence token under which PostgreSQL said the thread does not exist;
--       '' = not known), op ('put'|'del'), channel, ts_ms, tid,
--       new owner_id (del: the believed one), believed current owner_id
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
if deleted then return {'GONE', v} end
if v == '0' and ARGV[5] == 'del' then return {'NOTFOUND'} end
if ARGV[3] ~= '' and ARGV[3] ~= v then return {'PRECONDITION', v} end
-- Inbox: the owner the thread has now ('' for a new one; a hash from before `o`: its doc's).
local owner = redis.call('HGET', t, 'o')
if not owner then
  local old = redis.call('HGET', t, 'doc')
  owner = old and cjson.decode(old).owner_id or ''
end
if v ~= '0' and owner ~= ARGV[10] then return {'OWNER', owner} end

local nv = redis.call('HINCRBY', t, 'v', 1)
local doc = '{"version":' .. string.format('%d', nv) .. ',"created_at":' .. created .. ','
  .. string.sub(ARGV[1], 2)
local event = 'thread.updated'
if ARGV[5] == 'del' then event = 'thread.deleted' elseif v == '0' then event = 'thread.created' end
redis.call('HSET', t, 'doc', doc, 'c', created, 'del', ARGV[5] == 'del' and '1' or '0')
redis.call('HSETNX', t, 'seq', '0')
redis.call('HSETNX', t, 'ft', '0')
redis.call('HINCRBY', t, 'pend', 1)
for _, k in ipairs({t, KEYS[2], KEYS[3], KEYS[6], KEYS[7]}) do redis.call('PERSIST', k) end
local seq = redis.call('HGET', t, 'seq')
-- Inbox: last activity (never backwards) in the hash and the owner's index of this shard.
local la = string.format('%d', math.max(tonumber(redis.call('HGET', t, 'la') or '0'),
  tonumber(ARGV[7])))
redis.call('HSET', t, 'la', la, 'o', ARGV[9])
if owner ~= '' and (ARGV[5] == 'del' or owner ~= ARGV[9]) then
  redis.call('ZREM', KEYS[9], ARGV[8])  -- tombstoned, or moved to another owner
end
if ARGV[5] ~= 'del' and ARGV[9] ~= '' then redis.call('ZADD', KEYS[8], la, ARGV[8]) end
redis.call('XADD', KEYS[4], '*', 'k', 't', 'id', ARGV[8], 'v', string.format('%d', nv),
  'e', event, 'ts', ARGV[7], 'd', doc)
redis.call('PUBLISH', ARGV[6], '{"type":"' .. event .. '","thread_id":"' .. ARGV[8]
  .. '","last_seq":' .. seq .. ',"ts":' .. ARGV[7] .. ',"thread":' .. doc .. '}')
if v == '0' then return {'CREATED', string.format('%d', nv), doc, seq} end
return {'OK', string.format('%d', nv), doc, seq}
