-- Create, update or tombstone a thread, and log the change, atomically.
-- KEYS: thread, messages, window, log, load fence, recent ids, overlay,
--       changes (the changes feed: the thread, member '', moves to its new cseq)
-- ARGV: body (JSON object without version/created_at), now (JSON string), if_match ('' = none),
--       new (the load fence token under which PostgreSQL said the thread does not exist;
--       '' = not known), op ('put'|'del'), channel, ts_ms, tid
-- Returns {status, version, doc}: MISS when Redis lacks the thread and "new" is not (or no
-- longer: the fence moved) known. Nothing is written unless every check passes.
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

local nv = redis.call('HINCRBY', t, 'v', 1)
local cs = string.format('%d', redis.call('HINCRBY', t, 'cs', 1))  -- the change's cseq
local doc = '{"version":' .. string.format('%d', nv) .. ',"cseq":' .. cs .. ',"created_at":'
  .. created .. ','
  .. string.sub(ARGV[1], 2)
local event = 'thread.updated'
if ARGV[5] == 'del' then event = 'thread.deleted' elseif v == '0' then event = 'thread.created' end
redis.call('HSET', t, 'doc', doc, 'c', created, 'del', ARGV[5] == 'del' and '1' or '0')
redis.call('HSETNX', t, 'seq', '0')
redis.call('HSETNX', t, 'ft', '0')
redis.call('HINCRBY', t, 'pend', 1)
for _, k in ipairs({t, KEYS[2], KEYS[3], KEYS[6], KEYS[7], KEYS[8]}) do redis.call('PERSIST', k) end
redis.call('ZADD', KEYS[8], cs, '')
local seq = redis.call('HGET', t, 'seq')
redis.call('XADD', KEYS[4], '*', 'k', 't', 'id', ARGV[8], 'v', string.format('%d', nv),
  'e', event, 'ts', ARGV[7], 'd', doc)
redis.call('PUBLISH', ARGV[6], '{"type":"' .. event .. '","thread_id":"' .. ARGV[8]
  .. '","last_seq":' .. seq .. ',"ts":' .. ARGV[7] .. ',"cseq":' .. cs .. ',"thread":' .. doc
  .. '}')
if v == '0' then return {'CREATED', string.format('%d', nv), doc, seq} end
return {'OK', string.format('%d', nv), doc, seq}
