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

-- Erase: XDEL every entry `match` names (by its message id, '' for the thread's own) from the
-- log (and every group's pending list) and from the dead letters. An entry the release group
-- has not acknowledged, or a dead letter of that group, still holds an unflushed count: it is
-- given back here (this change counts one itself). Entries meant for another group alone
-- (field g) never held one. The entries come from the caller's paged read-ahead (ARGV from
-- `at`: the last log id and dead-letter id it read, how many log ids, the log ids, the
-- dead-letter ids), each checked again here; what came after those it read is scanned here,
-- so every entry is seen atomically without a scan of the whole log blocking Redis.
-- (The same function is in thread_put.lua: scripts cannot share code.)
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
