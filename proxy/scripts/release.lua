-- After a PostgreSQL commit: XACK the flushed entries and, for each entity with no unflushed
-- change left, give its keys their cache TTL; trim flushed messages out of thread windows.
-- Only entries this call really acknowledged count (a redelivered or zombie batch acks
-- nothing twice), so `pend` stays exact.
-- KEYS: log, then per entity: thread, messages, window, load fence (kind 't') or state, load
--       fence (kind 's')
-- ARGV: group, ttl_ms, window size, now_ms, then per entry: entry id, key index, kind, mid or ''
-- Every released entity's load fence is deleted: a read-through that began before this flush
-- may have read older rows, and must not install them once the keys expire.
-- Returns how many unflushed counts would have gone below 0 (never applied: an alarm).
local group, ttl, window, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])

-- Drop flushed messages below the newest `window` ones, oldest first, stopping at the first
-- one still unflushed (the window stays a contiguous suffix), at most 1000 per call.
local function trim(t, m, w)
  local excess = redis.call('ZCARD', w) - window
  if excess <= 0 then return end
  local low = redis.call('ZRANGE', w, 0, math.min(excess, 1000) - 1, 'WITHSCORES')
  local fields, n = {}, 0
  for i = 1, #low, 2 do fields[#fields + 1] = 'p|' .. low[i] end
  local pending = redis.call('HMGET', m, unpack(fields))
  while n < #pending and not pending[n + 1] do n = n + 1 end
  if n == 0 then return end
  local gone = {}
  for i = 1, n do
    gone[#gone + 1] = 'd|' .. low[2 * i - 1]
    gone[#gone + 1] = 'm|' .. low[2 * i - 1]
  end
  redis.call('ZREMRANGEBYRANK', w, 0, n - 1)
  redis.call('HDEL', m, unpack(gone))
  redis.call('HSET', t, 'fl', low[2 * n])
end

local touched, negative = {}, 0
-- One acknowledged entry: one unflushed change less, never below zero.
local function settle(k, field)
  local left = tonumber(redis.call('HGET', k, field) or '0')
  if left <= 0 then
    negative = negative + 1
    return 0
  end
  return redis.call('HINCRBY', k, field, -1)
end

for i = 5, #ARGV, 4 do
  local idx, kind, mid = tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3]
  touched[idx] = kind
  if redis.call('XACK', KEYS[1], group, ARGV[i]) == 1 and redis.call('EXISTS', KEYS[idx]) == 1 then
    settle(KEYS[idx], 'pend')
    if mid ~= '' and redis.call('HINCRBY', KEYS[idx + 1], 'p|' .. mid, -1) <= 0 then
      redis.call('HDEL', KEYS[idx + 1], 'p|' .. mid)
    end
  end
end

for idx, kind in pairs(touched) do
  local k = KEYS[idx]
  redis.call('DEL', KEYS[idx + (kind == 't' and 3 or 1)])
  local pend = redis.call('HGET', k, 'pend')
  if kind == 't' then trim(k, KEYS[idx + 1], KEYS[idx + 2]) end
  if pend and tonumber(pend) == 0 then
    if kind == 't' then
      redis.call('PEXPIRE', k, ttl)
      redis.call('PEXPIRE', KEYS[idx + 1], ttl)
      redis.call('PEXPIRE', KEYS[idx + 2], ttl)
    else
      local x, keep = redis.call('HGET', k, 'x'), ttl
      if x and x ~= '' then keep = math.max(1, math.min(ttl, tonumber(x) - now)) end
      redis.call('PEXPIRE', k, keep)
    end
  end
end
return negative
