-- After Redis lost data it had acknowledged (a restart from an AOF missing the last writes, a
-- failover to a replica that missed them), PostgreSQL may hold seqs and versions beyond what
-- Redis went back to. An entity with nothing unflushed is dropped (read through again, fresh);
-- one with unflushed changes keeps them and has its counters raised to PostgreSQL's, never
-- lowered, so the next write cannot hand out a seq or version that is already taken.
-- After write-through (mode 'drop'), PostgreSQL's copy is the newer one: an entity behind it
-- is dropped once clean, and one with unflushed changes is left alone for now (2: pending).
-- Mode 'behind' is 'drop' for an entity written through: behind whatever its counters say
-- (Redis handed out a seq it had not flushed; write-through gave PostgreSQL's next one too).
-- KEYS: an entity's keys: a thread's hash, messages, window, recent ids, overlay, read
--       markers, changes; or a state entry's hash
-- ARGV: mode ('raise' | 'drop' | 'behind'), PostgreSQL's version, last seq ('' for state), then
--       (mid, version) per message, and last ('', last_cseq): the pair of the thread itself
--       (member '', as in the changes set) with PostgreSQL's last change number. Raising the
--       cseq also raises the changes floor: the changes Redis lost are read from PostgreSQL.
-- Returns 0 up to date, 1 dropped, 2 raised (or, for 'drop', pending).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local cur = redis.call('HMGET', KEYS[1], 'v', 'seq', 'pend', 'cs', 'cf')
local behind = ARGV[1] == 'behind' or tonumber(cur[1]) < tonumber(ARGV[2])
  or (ARGV[3] ~= '' and tonumber(cur[2]) < tonumber(ARGV[3]))
local messages, cseq = {}, 0
for i = 4, #ARGV, 2 do
  if ARGV[i] == '' then cseq = tonumber(ARGV[i + 1]) end
  local meta = ARGV[i] ~= '' and redis.call('HGET', KEYS[2], 'm|' .. ARGV[i])
  local v, rest = string.match(meta or '', '^(%d+),(.*)$')
  if v and tonumber(v) < tonumber(ARGV[i + 1]) then
    behind = true
    messages[#messages + 1] = {ARGV[i], ARGV[i + 1] .. ',' .. rest}
  end
end
local cs_behind = tonumber(cur[4] or '0') < cseq
behind = behind or cs_behind
if not behind then return 0 end
if tonumber(cur[3] or '0') == 0 then
  redis.call('DEL', unpack(KEYS))
  return 1
end
if ARGV[1] ~= 'raise' then return 2 end
if tonumber(cur[1]) < tonumber(ARGV[2]) then redis.call('HSET', KEYS[1], 'v', ARGV[2]) end
if ARGV[3] ~= '' and tonumber(cur[2]) < tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'seq', ARGV[3])
end
for _, m in ipairs(messages) do redis.call('HSET', KEYS[2], 'm|' .. m[1], m[2]) end
if cs_behind then
  local c = string.format('%d', cseq)
  redis.call('HSET', KEYS[1], 'cs', c)
  if tonumber(cur[5] or '0') < cseq then redis.call('HSET', KEYS[1], 'cf', c) end
end
return 2
