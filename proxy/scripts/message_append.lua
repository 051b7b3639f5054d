-- Append a message: assign the thread's next seq, store it, index it, log it, atomically.
-- KEYS: thread, messages, window, log, load fence, recent ids,
--       the inbox index of the believed owner on this shard (see ARGV),
--       changes (the changes feed: the new message joins it at its cseq)
-- ARGV: tid, mid, body (JSON object starting after seq), fingerprint, channel, ts_ms (when
--       the body was made: its created_at), checked ('*': a new generated id, in no store; a
--       load fence token: PostgreSQL said the id is not there, read under that token; '':
--       not checked), id_ms (the creation time a ULID id carries, 0 for other ids),
--       skew_ms (how far a client's clock may run ahead of ours),
--       owner_id the caller believes the thread has (inbox)
-- Returns {status, ...}: CREATED doc; DUP doc — or DUP '' version ts seq cseq when the
-- message left the window and only its id is still known (cseq: of its latest change, '' if
-- not known); CONFLICT; MISS (thread not in Redis); GONE
-- (thread deleted); CHECK (the id may be in PostgreSQL only, and was not checked, or the
-- check is stale: the thread was released since, e.g. a peer's copy flushed and trimmed);
-- OWNER, owner (inbox: the thread's owner is not the believed one, whose index was given).
local th = redis.call('HMGET', KEYS[1], 'seq', 'del', 'ft')
if not th[1] then return {'MISS'} end
if th[2] == '1' then return {'GONE'} end
local mid = ARGV[2]
local meta = redis.call('HGET', KEYS[2], 'm|' .. mid)
if meta then
  local v, fp, ts = string.match(meta, '^(%d+),(%w+),?(%d*)$')
  if fp ~= ARGV[4] then return {'CONFLICT'} end
  local doc = redis.call('HGET', KEYS[2], 'd|' .. mid)
  if doc then return {'DUP', doc} end
  return {'DUP', '', v, ts, redis.call('ZSCORE', KEYS[6], mid) or '',
    redis.call('HGET', KEYS[2], 'c|' .. mid) or ''}
end
-- Ids of messages appended up to `ft` (ms) may be known to PostgreSQL only. An id needs no
-- check if it was made here, checked under a fence that still holds, or is a ULID made
-- after `ft` (+ skew): no message appended by then can carry it.
local forgotten = tonumber(th[3] or '0')
if forgotten > 0 and ARGV[7] ~= '*' and tonumber(ARGV[8]) <= forgotten + tonumber(ARGV[9])
  and (ARGV[7] == '' or redis.call('SISMEMBER', KEYS[5], ARGV[7]) == 0)
then
  return {'CHECK'}
end

-- Inbox: the thread's owner must be the believed one (its index key is KEYS[7]).
local owner = redis.call('HGET', KEYS[1], 'o')
if not owner then owner = cjson.decode(redis.call('HGET', KEYS[1], 'doc')).owner_id end
if owner ~= ARGV[10] then return {'OWNER', owner} end

local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local s = string.format('%d', seq)
local cs = string.format('%d', redis.call('HINCRBY', KEYS[1], 'cs', 1))  -- the change's cseq
local doc = '{"seq":' .. s .. ',"cseq":' .. cs .. ',' .. string.sub(ARGV[3], 2)
redis.call('HSET', KEYS[2], 'd|' .. mid, doc, 'm|' .. mid, '1,' .. ARGV[4] .. ',' .. ARGV[6],
  'p|' .. mid, '1')
redis.call('ZADD', KEYS[3], seq, mid)
redis.call('HINCRBY', KEYS[1], 'pend', 1)
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[2])
redis.call('PERSIST', KEYS[3])
redis.call('PERSIST', KEYS[6])
redis.call('PERSIST', KEYS[8])
redis.call('ZADD', KEYS[8], cs, mid)
redis.call('XADD', KEYS[4], '*', 'k', 'm', 'id', mid, 'tid', ARGV[1], 'v', '1',
  'e', 'message.created', 'ts', ARGV[6], 'd', doc, 'f', ARGV[4])
redis.call('PUBLISH', ARGV[5], '{"type":"message.created","thread_id":"' .. ARGV[1]
  .. '","seq":' .. s .. ',"ts":' .. ARGV[6] .. ',"cseq":' .. cs .. ',"message":' .. doc .. '}')
-- Inbox: last activity (never backwards) in the hash and the owner's index of this shard.
local la = string.format('%d', math.max(tonumber(redis.call('HGET', KEYS[1], 'la') or '0'),
  tonumber(ARGV[6])))
redis.call('HSET', KEYS[1], 'la', la)
if owner ~= '' then redis.call('ZADD', KEYS[7], la, ARGV[1]) end
return {'CREATED', doc}
