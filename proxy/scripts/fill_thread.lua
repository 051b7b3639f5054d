-- Read-through: put a thread loaded from PostgreSQL into Redis, unless Redis has it already.
-- KEYS: thread, messages, window
-- ARGV: doc, version, created_at (JSON string), last_seq, deleted ('1'|'0'), ttl_ms
-- Leftover message/window keys of an expired thread are clean (they got their TTL together
-- with the thread), so they are dropped: the window must stay a contiguous suffix.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'doc', ARGV[1], 'v', ARGV[2], 'c', ARGV[3], 'seq', ARGV[4],
  'del', ARGV[5], 'fl', ARGV[4], 'pend', '0')
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
