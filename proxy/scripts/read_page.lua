-- Read a page of a thread's messages from the window in one round trip.
-- KEYS: thread, messages, window
-- ARGV: mode ('latest'|'after'|'before'), cursor seq, limit
-- Returns {'MISS'} when the thread is not in Redis, {'GONE'} when it was deleted, else {status, last_seq, lo, hi, docs...}
-- where status is OK (docs for every seq lo..hi that Redis holds) or PARTIAL (some of lo..hi
-- lies below the window: the caller reads the page from PostgreSQL).
local th = redis.call('HMGET', KEYS[1], 'seq', 'del')
if not th[1] then return {'MISS'} end
if th[2] == '1' then return {'GONE'} end
local last = tonumber(th[1])
local cursor, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local lo, hi
if ARGV[1] == 'after' then
  lo, hi = cursor + 1, math.min(last, cursor + limit)
elseif ARGV[1] == 'before' then
  hi = math.min(cursor - 1, last)
  lo = math.max(1, hi - limit + 1)
else
  hi, lo = last, math.max(1, last - limit + 1)
end
if lo > hi then return {'OK', th[1], lo, hi} end
local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
local floor = last + 1
if first[2] then floor = tonumber(first[2]) end
if lo < floor then return {'PARTIAL', th[1], lo, hi} end
local mids = redis.call('ZRANGEBYSCORE', KEYS[3], lo, hi)
if #mids ~= hi - lo + 1 then return {'PARTIAL', th[1], lo, hi} end
local fields = {}
for i, mid in ipairs(mids) do fields[i] = 'd|' .. mid end
local out = {'OK', th[1], lo, hi}
local docs = redis.call('HMGET', KEYS[2], unpack(fields))
for i = 1, #docs do
  if not docs[i] then return {'PARTIAL', th[1], lo, hi} end
  out[#out + 1] = docs[i]
end
return out
