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

-- Erase: XDEL every entry `match` names (by its message id, '' for the thread's own) from the
-- log (and every group's pending list) and from the dead letters. An entry the release group
-- has not acknowledged, or a dead letter of that group, still holds an unflushed count: it is
-- given back here (this change counts one itself). Entries meant for another group alone
-- (field g) never held one. The entries come from the caller's paged read-ahead (ARGV from
-- `at`: the last log id and dead-letter id it read, how many log ids, the log ids, the
-- dead-letter ids), each checked again here; what came after those it read is scanned here,
-- so every entry is seen atomically without a scan of the whole log blocking Redis.
-- (The same function is in message_update.lua: scripts cannot share code.)
local function erase(log, dlq, thread, msgs, release, match, at)
  local function id_of(id)
    local ms, n = string.match(id, '^(%d+)-(%d+)$')
    return {tonumber(ms), tonumber(n)}
  end
  local function later(a, b) return a[1] > b[1] or (a[1] == b[1] and a[2] > b[2]) end
  local groups, delivered = {}, nil
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', log)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    groups[#groups + 1] = info['name']
    if info['name'] == release then delivered = id_of(info['last-delivered-id']) end
  end
  local function give_back(m)
    if tonumber(redis.call('HGET', thread, 'pend') or '0') > 0 then
      redis.call('HINCRBY', thread, 'pend', -1)
    end
    if m ~= '' and redis.call('HINCRBY', msgs, 'p|' .. m, -1) <= 0 then
      redis.call('HDEL', msgs, 'p|' .. m)
    end
  end
  local function visit(in_log, stream, entry)
    local f = {}
    for i = 1, #entry[2], 2 do f[entry[2][i]] = entry[2][i + 1] end
    local m = match(f)
    if not m then return end
    local counted
    if in_log then
      counted = (f['g'] or '') == '' or f['g'] == release
      if counted and delivered and not later(id_of(entry[1]), delivered) then
        counted = #redis.call('XPENDING', stream, release, entry[1], entry[1], 1) > 0
      end
      for _, g in ipairs(groups) do redis.call('XACK', stream, g, entry[1]) end
    else
      counted = f['group'] == release
    end
    if counted then give_back(m) end
    redis.call('XDEL', stream, entry[1])
  end
  local n = tonumber(ARGV[at + 2] or '0')
  local known = {{}, {}}
  for j = at + 3, #ARGV do
    local list = known[j < at + 3 + n and 1 or 2]
    list[#list + 1] = ARGV[j]
  end
  for s, stream in ipairs({log, dlq}) do
    for _, id in ipairs(known[s]) do
      local entry = redis.call('XRANGE', stream, id, id)[1]
      if entry then visit(s == 1, stream, entry) end
    end
    local last = ARGV[at + s - 1]
    for _, entry in ipairs(redis.call('XRANGE', stream, last and ('(' .. last) or '-', '+')) do
      visit(s == 1, stream, entry)
    end
  end
end
if erasing then
  if redis.call('EXISTS', KEYS[4]) == 1 then
    erase(KEYS[4], KEYS[8], t, KEYS[2], ARGV[11], function(f)
      if f['k'] == 'm' and f['tid'] == ARGV[8] then return f['id'] end
      if f['k'] == 't' and f['id'] == ARGV[8] then return '' end
    end, 12)
  end
  local docs = {}
  for _, field in ipairs(redis.call('HKEYS', KEYS[2])) do
    if string.sub(field, 1, 2) == 'd|' then docs[#docs + 1] = field end
  end
  for i = 1, #docs, 1000 do
    redis.call('HDEL', KEYS[2], unpack(docs, i, math.min(i + 999, #docs)))
  end
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
