-- Put dead letters back into the shard's log (after a fix), each for the one consumer group
-- that gave up on it (field g), and remove them from the dead-letter stream — in one step, so
-- concurrent replays (two sidecars, two clicks) move each dead letter exactly once.
-- KEYS: dead letters, log ; ARGV: how many at most
-- Returns how many were moved.
local letters = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', ARGV[1])
for _, letter in ipairs(letters) do
  local fields, out, group = letter[2], {}, ''
  for i = 1, #fields, 2 do
    local name = fields[i]
    if name == 'group' then
      group = fields[i + 1]
    elseif name ~= 'error' and name ~= 'source_id' and name ~= 'g' then
      out[#out + 1] = name
      out[#out + 1] = fields[i + 1]
    end
  end
  if #out > 0 then
    out[#out + 1] = 'g'
    out[#out + 1] = group
    redis.call('XADD', KEYS[2], '*', unpack(out))
  end
  redis.call('XDEL', KEYS[1], letter[1])
end
return #letters
