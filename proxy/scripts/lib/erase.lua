-- Erase: XDEL every entry `match` names (by its message id, '' for the thread's own) from the
-- log (and every group's pending list) and from the dead letters. An entry the release group
-- has not acknowledged, or a dead letter of that group, still holds an unflushed count: it is
-- given back here (this change counts one itself). Entries meant for another group alone
-- (field g) never held one. The entries come from the caller's paged read-ahead (ARGV from
-- `at`: the last log id and dead-letter id it read, how many log ids, the log ids, the
-- dead-letter ids), each checked again here; what came after those it read is scanned here,
-- so every entry is seen atomically without a scan of the whole log blocking Redis.
-- Shared by message_update.lua, thread_put.lua and erase_entries.lua: proxy/luascripts.py
-- puts this file in place of their include line before the scripts are loaded.
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

-- A thread erase's docs: every cached message doc of the thread (the d| fields of its
-- messages hash) goes, in HDELs of 1000; returns how many.
local function drop_docs(msgs)
  local docs = {}
  for _, field in ipairs(redis.call('HKEYS', msgs)) do
    if string.sub(field, 1, 2) == 'd|' then docs[#docs + 1] = field end
  end
  for i = 1, #docs, 1000 do
    redis.call('HDEL', msgs, unpack(docs, i, math.min(i + 999, #docs)))
  end
  return #docs
end
