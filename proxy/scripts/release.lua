-- After a PostgreSQL commit: XACK the flushed entries and, for each entity with no unflushed
-- change left, give its keys their cache TTL; trim flushed messages out of thread windows.
-- Only entries this call really acknowledged count (a redelivered or zombie batch acks
-- nothing twice), so `pend` stays exact.
-- KEYS: log, then per entity: thread, messages, window (kind 't') or state (kind 's')
-- ARGV: group, ttl_ms, window size, now_ms, then per entry: entry id, key index, kind, mid or ''
local group, ttl, window, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])

local function trim(t, m, w)
  local removed = 0
  while removed < 1000 and redis.call('ZCARD', w) > window do
    local low = redis.call('ZRANGE', w, 0, 0, 'WITHSCORES')
    if redis.call('HEXISTS', m, 'p|' .. low[1]) == 1 then return end
    redis.call('ZREM', w, low[1])
    redis.call('HDEL', m, 'd|' .. low[1], 'm|' .. low[1])
    redis.call('HSET', t, 'fl', low[2])
    removed = removed + 1
  end
end

local touched = {}
for i = 5, #ARGV, 4 do
  local idx, kind, mid = tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3]
  touched[idx] = kind
  if redis.call('XACK', KEYS[1], group, ARGV[i]) == 1 and redis.call('EXISTS', KEYS[idx]) == 1 then
    redis.call('HINCRBY', KEYS[idx], 'pend', -1)
    if mid ~= '' and redis.call('HINCRBY', KEYS[idx + 1], 'p|' .. mid, -1) <= 0 then
      redis.call('HDEL', KEYS[idx + 1], 'p|' .. mid)
    end
  end
end

for idx, kind in pairs(touched) do
  local k = KEYS[idx]
  local pend = redis.call('HGET', k, 'pend')
  if kind == 't' then trim(k, KEYS[idx + 1], KEYS[idx + 2]) end
  if pend and tonumber(pend) <= 0 then
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
return 0
