-- Write or tombstone a state entry if If-Match holds, and log it, atomically.
-- KEYS: state, log, load fence
-- ARGV: body (JSON object without version), if_match ('' = none), base ('' = unknown: the
--       key is not in Redis, ask PostgreSQL; else PostgreSQL's entry as
--       "<version>,<deleted 1|0>,<expires_at_ms or empty>", read under the fence token),
--       op ('put'|'del'), now_ms, expires_at_ms ('' = never), ts_ms, key, token
-- An entry past its expires_at counts as absent, but its version keeps counting, so a
-- newer write always carries a higher version than anything in the log.
-- Returns {status, version, doc}: CREATED, OK, PRECONDITION, NOTFOUND, MISS (also when the
-- base is stale: the fence moved since it was read).
local k = KEYS[1]
local cur = redis.call('HMGET', k, 'v', 'del', 'x')
local v, deleted, expires = cur[1], cur[2], cur[3]
if not v then
  if ARGV[3] == '' or redis.call('SISMEMBER', KEYS[3], ARGV[9]) == 0 then return {'MISS'} end
  v, deleted, expires = string.match(ARGV[3], '^(%d+),(%d),(%d*)$')
end
local live = deleted == '0' and not (expires and expires ~= ''
  and tonumber(expires) <= tonumber(ARGV[5]))
if ARGV[2] ~= '' and (not live or ARGV[2] ~= v) then
  return {'PRECONDITION', live and v or ''}
end
if ARGV[4] == 'del' and not live then return {'NOTFOUND'} end

local nv = string.format('%d', tonumber(v) + 1)
local doc = '{"version":' .. nv .. ',' .. string.sub(ARGV[1], 2)
redis.call('HSET', k, 'doc', doc, 'v', nv, 'del', ARGV[4] == 'del' and '1' or '0', 'x', ARGV[6])
redis.call('HINCRBY', k, 'pend', 1)
redis.call('PERSIST', k)
local event = ARGV[4] == 'del' and 'state.deleted' or 'state.updated'
redis.call('XADD', KEYS[2], '*', 'k', 's', 'id', ARGV[8], 'v', nv, 'e', event,
  'ts', ARGV[7], 'd', doc)
if live then return {'OK', nv, doc} end
return {'CREATED', nv, doc}
