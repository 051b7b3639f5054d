-- A user's read marker on a thread: read it with what Redis knows of the unread messages
-- after it ('get'), or move it forward ('put': a lower or equal seq changes nothing), storing,
-- logging and publishing the move atomically.
-- KEYS: thread, messages, window, log, recent ids, overlay, markers
-- ARGV: mode ('get'|'put'), user id, seq (put), doc (put: the marker at that seq), channel,
--       ts_ms, tid
-- Returns {'MISS'} (the thread is not in Redis), {'GONE'} (deleted), {'NOMARK'} (Redis does
-- not know the user's marker: PostgreSQL may), {'AHEAD', last_seq} (put: seq past the
-- thread's last seq); else {status, seq} for 'put' (MOVED or KEPT, seq the marker now), and
-- {'OK', seq, lo, hi, live, mids...} for 'get': `live` counts the live messages after the
-- marker in the window; lo..hi (empty when lo > hi) lies below the window, where PostgreSQL
-- holds every message (only flushed ones leave the window) and the mids are the messages of
-- lo..hi whose deletion is not flushed yet (the overlay), which PostgreSQL must not count.
local th = redis.call('HMGET', KEYS[1], 'seq', 'del')
if not th[1] then return {'MISS'} end
if th[2] == '1' then return {'GONE'} end
local last, uid = tonumber(th[1]), ARGV[2]
if ARGV[1] == 'put' and tonumber(ARGV[3]) > last then return {'AHEAD', th[1]} end
local cur = redis.call('HGET', KEYS[7], uid)
if not cur then return {'NOMARK'} end

if ARGV[1] == 'put' then
  if tonumber(ARGV[3]) <= tonumber(cur) then return {'KEPT', cur} end
  local s = ARGV[3]
  redis.call('HSET', KEYS[7], uid, s)
  redis.call('HINCRBY', KEYS[1], 'pend', 1)
  for _, i in ipairs({1, 2, 3, 5, 6, 7}) do redis.call('PERSIST', KEYS[i]) end
  redis.call('XADD', KEYS[4], '*', 'k', 'r', 'id', uid, 'tid', ARGV[7], 'v', s,
    'e', 'read.updated', 'ts', ARGV[6], 'd', ARGV[4])
  redis.call('PUBLISH', ARGV[5], '{"type":"read.updated","thread_id":"' .. ARGV[7]
    .. '","seq":' .. s .. ',"ts":' .. ARGV[6] .. ',"user_id":"' .. uid .. '"}')
  return {'MOVED', s}
end

-- The docs of `mids` (in slices: unpack has a limit), and whether each is a tombstone: a
-- message doc ends with its "deleted" field (model.message_body, backends.message_row).
local function each_deleted(mids, fn)
  for from = 1, #mids, 500 do
    local fields = {}
    for i = from, math.min(#mids, from + 499) do fields[#fields + 1] = 'd|' .. mids[i] end
    local docs = redis.call('HMGET', KEYS[2], unpack(fields))
    for i, doc in ipairs(docs) do
      fn(mids[from + i - 1], doc and string.sub(doc, -15) == '"deleted":true}')
    end
  end
end

local lo = tonumber(cur) + 1
local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
local floor = last + 1
if first[2] then floor = tonumber(first[2]) end
local live = 0
if math.max(lo, floor) <= last then
  each_deleted(redis.call('ZRANGEBYSCORE', KEYS[3], math.max(lo, floor), last),
    function(_, deleted) if not deleted then live = live + 1 end end)
end
local out = {'OK', cur, string.format('%d', lo), string.format('%d', floor - 1), live}
if lo < floor then
  each_deleted(redis.call('ZRANGEBYSCORE', KEYS[6], lo, floor - 1),
    function(mid, deleted) if deleted then out[#out + 1] = mid end end)
end
return out
