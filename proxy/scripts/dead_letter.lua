-- Give up on a log entry for one consumer group: acknowledge it and keep a copy with the reason
-- in the shard's dead-letter stream — only if this call is the one that acknowledged it, so
-- two consumers giving up on the same entry (a zombie and its reclaimer) leave one dead letter.
-- The entity's unflushed count is left as it is: its change is still not in the sink.
-- KEYS: log, dead letters ; ARGV: group, entry id, error
-- Returns 1 moved, 0 already acknowledged by someone else.
local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local fields = entry[1] and entry[1][2] or {}
local out = {}
for i = 1, #fields, 2 do
  if fields[i] ~= 'error' and fields[i] ~= 'group' and fields[i] ~= 'source_id' then
    out[#out + 1] = fields[i]
    out[#out + 1] = fields[i + 1]
  end
end
out[#out + 1] = 'error'
out[#out + 1] = ARGV[3]
out[#out + 1] = 'group'
out[#out + 1] = ARGV[1]
out[#out + 1] = 'source_id'
out[#out + 1] = ARGV[2]
redis.call('XADD', KEYS[2], '*', unpack(out))
return 1
