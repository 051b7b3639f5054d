-- Inbox: what Redis holds of some threads of an owner on this shard (candidates of a page,
-- from the index or from PostgreSQL). A thread hash outlives every unflushed change of its
-- thread (it gets a TTL only once clean), so Redis's answer is the current one; where it has
-- no hash, PostgreSQL's row is current, and an index entry left over is dropped.
-- KEYS: the owner's inbox index of this shard, then each thread's hash
-- ARGV: owner_id, then each thread's id (in the order of its hash in KEYS)
-- Returns per thread {state, doc, last_seq, last activity ms}: state 'live', 'gone'
-- (deleted or owned by someone else: dropped from the index) or 'none' (no hash).
local out = {}
for i = 2, #KEYS do
  local tid = ARGV[i]
  local h = redis.call('HMGET', KEYS[i], 'doc', 'seq', 'del', 'o', 'la')
  local state = 'none'
  if h[1] then
    local owner = h[4] or cjson.decode(h[1]).owner_id
    state = (h[3] ~= '1' and owner == ARGV[1]) and 'live' or 'gone'
  end
  if state ~= 'live' then redis.call('ZREM', KEYS[1], tid) end
  out[#out + 1] = state
  out[#out + 1] = h[1] or ''
  out[#out + 1] = h[2] or '0'
  out[#out + 1] = h[5] or '0'
end
return out
