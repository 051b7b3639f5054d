-- After a PostgreSQL commit: XACK the flushed entries and, for each entity with no unflushed
-- change left, give its keys their cache TTL; trim flushed messages out of thread windows.
-- Only entries this call really acknowledged count (a redelivered or zombie batch acks
-- nothing twice), so `pend` stays exact; it never goes below 0 (an alarm instead).
-- KEYS: log, then per entity: thread, messages, window, recent ids, overlay, load fence,
--       read markers, changes (kind 't': a thread, its messages and its markers; trimmed
--       messages leave the changes set, raising its floor `cf`) or state, load fence
--       (kind 's')
-- ARGV: group, ttl_ms, window size, recent ids kept, now_ms, then per entry: entry id,
--       key index, kind, mid or ''
-- Every released entity's load fence is deleted: a read-through that began before this flush
-- may have read older rows, and must not install them once the keys expire.
-- Returns how many unflushed counts would have gone below 0.
local group, ttl, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local keep, now = tonumber(ARGV[4]), tonumber(ARGV[5])
local FIRST = 6

-- Forget the oldest recent ids past `keep`: their messages are then known to PostgreSQL
-- only, which `ft` (the latest append time among forgotten ids, ms) tells message_append.
local function forget(t, m, r)
  local excess = redis.call('ZCARD', r) - keep
  if excess <= 0 then return end
  local old = redis.call('ZPOPMIN', r, math.min(excess, 1000))
  local fields, cseqs = {}, {}
  for i = 1, #old, 2 do
    fields[#fields + 1] = 'm|' .. old[i]
    cseqs[#cseqs + 1] = 'c|' .. old[i]
  end
  local latest = tonumber(redis.call('HGET', t, 'ft') or '0')
  for _, meta in ipairs(redis.call('HMGET', m, unpack(fields))) do
    local ts = meta and tonumber(string.match(meta, '^%d+,%w+,(%d+)$') or '0') or 0
    if ts > latest then latest = ts end
  end
  redis.call('HDEL', m, unpack(fields))
  redis.call('HDEL', m, unpack(cseqs))
  -- A forgotten id without an append time came from PostgreSQL after the last fill: `ft`
  -- covers it already, unless nothing was forgotten before.
  if latest == 0 then latest = now end
  redis.call('HSET', t, 'ft', string.format('%d', latest))
end

-- Drop flushed messages below the newest `window` ones, oldest first, stopping at the first
-- one still unflushed (the window stays a contiguous suffix), at most 1000 per call. Their
-- docs go; their ids stay as recent ids (idempotent retries need no PostgreSQL), and they
-- leave the changes set `c` (the feed reads them from PostgreSQL: `cf` covers them); their
-- cseq stays as `c|mid` in the messages hash `m` while their id is recent (a repeated append
-- is answered with its original doc from Redis alone). The oldest are looked at in chunks
-- that double (16, 32, ...): a release frees a few per thread, and reading up to 1000 pending
-- flags each time to find them was most of a flush's Redis time.
local function unfeed(t, m, c, mids)
  local floor, removed = tonumber(redis.call('HGET', t, 'cf') or '0'), false
  for _, mid in ipairs(mids) do
    local score = redis.call('ZSCORE', c, mid)
    if score then
      floor, removed = math.max(floor, tonumber(score)), true
      redis.call('ZREM', c, mid)
      redis.call('HSET', m, 'c|' .. mid, score)
    end
  end
  if removed and redis.call('EXISTS', t) == 1 then
    redis.call('HSET', t, 'cf', string.format('%d', floor))
  end
end

local function trim(t, m, w, r, c)
  local excess = math.min(redis.call('ZCARD', w) - window, 1000)
  if excess <= 0 then return end
  local low, n, chunk = {}, 0, 16
  while n < excess do
    local size = math.min(chunk, excess - n)
    local part = redis.call('ZRANGE', w, n, n + size - 1, 'WITHSCORES')
    local fields = {}
    for i = 1, #part, 2 do fields[#fields + 1] = 'p|' .. part[i] end
    local pending, k = redis.call('HMGET', m, unpack(fields)), 0
    while k < #pending and not pending[k + 1] do k = k + 1 end
    for i = 1, 2 * k do low[#low + 1] = part[i] end
    n = n + k
    if k < size then break end
    chunk = chunk * 2
  end
  if n == 0 then return end
  local docs, recent, mids = {}, {}, {}
  for i = 1, n do
    docs[#docs + 1] = 'd|' .. low[2 * i - 1]
    recent[#recent + 1] = low[2 * i]
    recent[#recent + 1] = low[2 * i - 1]
    mids[#mids + 1] = low[2 * i - 1]
  end
  unfeed(t, m, c, mids)
  redis.call('ZREMRANGEBYRANK', w, 0, n - 1)
  redis.call('HDEL', m, unpack(docs))
  redis.call('ZADD', r, unpack(recent))
  forget(t, m, r)
end

local touched, negative = {}, 0
-- One acknowledged entry: one unflushed change less, never below zero.
local function settle(k)
  if tonumber(redis.call('HGET', k, 'pend') or '0') <= 0 then
    negative = negative + 1
  else
    redis.call('HINCRBY', k, 'pend', -1)
  end
end

for i = FIRST, #ARGV, 4 do
  local idx, kind, mid = tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3]
  touched[idx] = kind
  if redis.call('XACK', KEYS[1], group, ARGV[i]) == 1 and redis.call('EXISTS', KEYS[idx]) == 1 then
    settle(KEYS[idx])
    if mid ~= '' and redis.call('HINCRBY', KEYS[idx + 1], 'p|' .. mid, -1) <= 0 then
      redis.call('HDEL', KEYS[idx + 1], 'p|' .. mid)
      redis.call('ZREM', KEYS[idx + 4], mid)  -- flushed: PostgreSQL's doc is current again
    end
  end
end

for idx, kind in pairs(touched) do
  local k = KEYS[idx]
  redis.call('DEL', KEYS[idx + (kind == 't' and 5 or 1)])
  local pend = redis.call('HGET', k, 'pend')
  if kind == 't' then trim(k, KEYS[idx + 1], KEYS[idx + 2], KEYS[idx + 3], KEYS[idx + 7]) end
  if pend and tonumber(pend) == 0 then
    if kind == 't' then
      for j = idx, idx + 4 do redis.call('PEXPIRE', KEYS[j], ttl) end
      redis.call('PEXPIRE', KEYS[idx + 6], ttl)  -- the read markers (issue 12.2)
      redis.call('PEXPIRE', KEYS[idx + 7], ttl)  -- the changes set
    else
      local x, life = redis.call('HGET', k, 'x'), ttl
      if x and x ~= '' then life = math.max(1, math.min(ttl, tonumber(x) - now)) end
      redis.call('PEXPIRE', k, life)
    end
  end
end
return negative
