-- How many log entries are at or after a group's first undelivered id. Redis 6.2 has no group
-- lag field, so count them here, where reading entries costs no reply to send and parse (the
-- monitor counted them in Python: ~15% of a worker draining a large backlog). From whichever
-- side of `start` is short, at most `cap` entries each; past the cap on both sides the stream
-- length is the answer (an upper bound, which errs towards backpressure).
-- KEYS: log ; ARGV: start id, cap
local length = redis.call('XLEN', KEYS[1])
if length == 0 then return 0 end
local cap = tonumber(ARGV[2])
local after = #redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', cap)
if after < cap then return after end
local before = #redis.call('XRANGE', KEYS[1], '-', '(' .. ARGV[1], 'COUNT', cap)
if before < cap then return length - before end
return length
