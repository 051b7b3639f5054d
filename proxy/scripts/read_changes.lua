-- The changes feed from Redis: the current doc of every entity of a thread (the thread itself,
-- member '', and its messages) whose latest change has a cseq after `after`, in cseq order.
-- KEYS: thread, messages, changes, cold cache
-- ARGV: after (a cseq), limit
-- Returns {'MISS'} (the thread is not in Redis), {'GONE'} (deleted), {'AHEAD', cs} (`after`
-- is past the thread's last cseq cs: a position this Redis never gave, or lost), else
-- {status, cs, n, then (member, cseq, doc) n times}: OK when Redis holds every change after
-- `after` with its doc (`after` is at or above the floor cf: nothing above it left the set);
-- BELOW when PostgreSQL must be read as well (doc '' where Redis no longer holds it).
local th = redis.call('HMGET', KEYS[1], 'doc', 'del', 'cs', 'cf')
if not th[1] then return {'MISS'} end
if th[2] == '1' then return {'GONE'} end
local cs, after = tonumber(th[3] or '0'), tonumber(ARGV[1])
if after > cs then return {'AHEAD', string.format('%d', cs)} end
local got = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. ARGV[1], '+inf', 'WITHSCORES',
  'LIMIT', 0, tonumber(ARGV[2]))
local status = after >= tonumber(th[4] or '0') and 'OK' or 'BELOW'
local out = {status, string.format('%d', cs), #got / 2}
for i = 1, #got, 2 do
  local member, doc = got[i], th[1]
  if member ~= '' then
    doc = redis.call('HGET', KEYS[2], 'd|' .. member) or redis.call('HGET', KEYS[4], member)
  end
  if not doc then status, doc = 'BELOW', '' end
  out[#out + 1] = member
  out[#out + 1] = got[i + 1]
  out[#out + 1] = doc
end
out[1] = status
return out
