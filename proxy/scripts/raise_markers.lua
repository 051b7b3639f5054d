-- After write-through moved read markers forward in PostgreSQL: raise the ones Redis caches
-- lower to PostgreSQL's (a marker only moves forward; PostgreSQL already holds the move, so
-- nothing is logged). A marker Redis moved meanwhile past PostgreSQL's is kept.
-- KEYS: a thread's read markers ; ARGV: (user id, PostgreSQL's seq) pairs
-- Returns how many were raised.
local raised = 0
for i = 1, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if cur and tonumber(cur) < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    raised = raised + 1
  end
end
return raised
