-- Inbox: an owner's threads on this shard, newest activity first, strictly below a cursor.
-- KEYS: the owner's inbox index of this shard (tid -> last activity ms)
-- ARGV: cursor ms ('+inf': from the top), cursor tid ('' with '+inf'), limit
-- Returns {tid, score, ...}: at most `limit`, ordered by (score, tid) descending (the order
-- of ZREVRANGEBYSCORE for equal scores), so the cursor position itself is skipped.
local limit, out, offset = tonumber(ARGV[3]), {}, 0
while #out < 2 * limit do
  local got = redis.call('ZREVRANGEBYSCORE', KEYS[1], ARGV[1], '-inf', 'WITHSCORES',
    'LIMIT', offset, limit)
  for i = 1, #got, 2 do
    -- Members at the cursor's own score are below it only with a smaller tid.
    if #out < 2 * limit and (ARGV[2] == '' or tonumber(got[i + 1]) ~= tonumber(ARGV[1])
        or got[i] < ARGV[2]) then
      out[#out + 1] = got[i]
      out[#out + 1] = got[i + 1]
    end
  end
  if #got < 2 * limit then break end
  offset = offset + limit
end
return out
