-- Read-through: put a thread loaded from PostgreSQL back into Redis, unless Redis has it
-- already or the load is stale (its fence token is gone: the thread was released since).
-- KEYS: thread, messages, window, fence, recent ids, overlay,
--       changes (dropped like the message keys; the floor `cf` = the last cseq)
-- ARGV: doc, version, created_at (JSON string), last_seq, deleted ('1'|'0'), ttl_ms, token,
--       now_ms, owner_id, last activity ms (inbox: the hash keeps both; the index is not
--       touched: PostgreSQL holds the same activity),
--       last_cseq (PostgreSQL's last change number of the thread)
-- Returns 1 filled, 0 present, -1 stale. Leftover message keys of an expired thread are clean
-- (they got their TTL together with the thread), so they are dropped — the window must stay a
-- contiguous suffix — but the seq never goes below one they hold. Every message id so far is
-- then known to PostgreSQL only (ft = now, unless the thread has none).
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('SISMEMBER', KEYS[4], ARGV[7]) == 0 then return -1 end
local seq = tonumber(ARGV[4])
local top = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
if top[2] and tonumber(top[2]) > seq then seq = tonumber(top[2]) end
local forgotten = seq > 0 and ARGV[8] or '0'
seq = string.format('%d', seq)
-- Nor does the cseq go below one the leftover changes set holds: the feed stays gapless.
local cs = tonumber(ARGV[11] or '0')
local ctop = redis.call('ZRANGE', KEYS[7], -1, -1, 'WITHSCORES')
if ctop[2] and tonumber(ctop[2]) > cs then cs = tonumber(ctop[2]) end
cs = string.format('%d', cs)
redis.call('DEL', KEYS[2], KEYS[3], KEYS[5], KEYS[6], KEYS[7])
redis.call('HSET', KEYS[1], 'doc', ARGV[1], 'v', ARGV[2], 'c', ARGV[3], 'seq', seq,
  'del', ARGV[5], 'ft', forgotten, 'pend', '0', 'cs', cs, 'cf', cs)
redis.call('HSET', KEYS[1], 'o', ARGV[9], 'la', ARGV[10])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
