-- Read a page of a thread's messages from the window in one round trip.
-- KEYS: thread, messages, window, overlay
-- ARGV: mode ('latest'|'after'|'before'), cursor seq, limit
-- Returns {'MISS'} when the thread is not in Redis, {'GONE'} when it was deleted, else
-- {status, last_seq, lo, hi, floor, n, docs...}: OK (the n docs of every seq lo..hi) or
-- PARTIAL (lo..floor-1 lies below the window and is read from PostgreSQL, where everything
-- below the window is — only flushed messages leave it; the n docs are those of floor..hi,
-- and the docs after them are the overlay: unflushed edits of messages in lo..floor-1, which
-- replace what PostgreSQL has for them).
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
if lo > hi then return {'OK', th[1], lo, hi, lo, 0} end

local function docs_of(mids)
  if #mids == 0 then return {} end
  local fields = {}
  for i, mid in ipairs(mids) do fields[i] = 'd|' .. mid end
  return redis.call('HMGET', KEYS[2], unpack(fields))
end

local function partial(floor, window_docs)
  local out = {'PARTIAL', th[1], lo, hi, floor, #window_docs}
  for _, doc in ipairs(window_docs) do out[#out + 1] = doc end
  for _, doc in ipairs(docs_of(redis.call('ZRANGEBYSCORE', KEYS[4], lo, floor - 1))) do
    if doc then out[#out + 1] = doc end
  end
  return out
end

local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
local floor = last + 1
if first[2] then floor = tonumber(first[2]) end
floor = math.max(lo, floor)
local docs = floor <= hi and docs_of(redis.call('ZRANGEBYSCORE', KEYS[3], floor, hi)) or {}
for i = 1, #docs do
  if not docs[i] then return partial(hi + 1, {}) end
end
if lo < floor then return partial(floor, docs) end
local out = {'OK', th[1], lo, hi, floor, #docs}
for _, doc in ipairs(docs) do out[#out + 1] = doc end
return out
