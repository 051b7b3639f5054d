-- Read-through: put messages loaded from PostgreSQL back into Redis, unless the load is stale
-- (its fence token is gone: the thread was released since the load began).
-- KEYS: thread, messages, window, cold cache, fence, recent ids
-- ARGV: ttl_ms, window size, token, then (mid, seq, version, fingerprint, doc) per message,
--       by seq. Returns 1 extended the window, 0 cold cache, -1 stale.
-- A page that ends right below the window extends it (the window stays a contiguous suffix);
-- other messages go to the cold cache, a hash with a TTL. Messages already in Redis win (a
-- recent id whose doc left with the window gets the doc back, and is in the window again).
local n = (#ARGV - 3) / 5
if n == 0 then return 0 end
if redis.call('SISMEMBER', KEYS[5], ARGV[3]) == 0 then return -1 end
local th = redis.call('HMGET', KEYS[1], 'seq', 'pend')
local extend = false
if th[1] then  -- without the thread in Redis, only the cold cache can take them
  local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  local floor = tonumber(th[1]) + 1
  if first[2] then floor = tonumber(first[2]) end
  local top = tonumber(ARGV[3 + 5 * (n - 1) + 2])
  local card = redis.call('ZCARD', KEYS[3])
  extend = top + 1 == floor and (th[2] == '0' or card + n <= tonumber(ARGV[2]))
end
for i = 0, n - 1 do
  local b = 3 + 5 * i
  local mid, seq, v, fp, doc = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5]
  if extend then
    if redis.call('HSETNX', KEYS[2], 'm|' .. mid, v .. ',' .. fp) == 1
      or redis.call('HEXISTS', KEYS[2], 'd|' .. mid) == 0 then
      redis.call('HSET', KEYS[2], 'd|' .. mid, doc)
    end
    redis.call('ZADD', KEYS[3], 'NX', seq, mid)
    redis.call('ZREM', KEYS[6], mid)
  elseif redis.call('HEXISTS', KEYS[2], 'm|' .. mid) == 0 then
    redis.call('HSET', KEYS[4], mid, doc)
  end
end
if extend and th[2] == '0' then
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[3], ARGV[1])
end
redis.call('PEXPIRE', KEYS[4], ARGV[1])
return extend and 1 or 0
