-- Drop the log entries every consumer group has acknowledged: trim to the oldest id that some
-- group still holds pending or has not been delivered yet (XTRIM MINID, exact; never MAXLEN).
-- Refused while a configured group is missing: it would have to start at 0 and find the
-- entries it never got trimmed away.
-- KEYS: log ; ARGV: every configured group
-- Returns the number of entries trimmed, or -1 (a group is missing: nothing trimmed).
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return {tonumber(ms), tonumber(seq)}
end
local function less(a, b)
  return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2])
end
local seen, floor = {}, nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  seen[info['name']] = true
  local last = parse(info['last-delivered-id'])
  local low = {last[1], last[2] + 1}  -- the first entry it has not been delivered
  if info['pending'] > 0 then
    local summary = redis.call('XPENDING', KEYS[1], info['name'])
    if summary[2] then
      local oldest = parse(summary[2])
      if less(oldest, low) then low = oldest end
    end
  end
  if floor == nil or less(low, floor) then floor = low end
end
for _, group in ipairs(ARGV) do
  if not seen[group] then return -1 end
end
if floor == nil then return 0 end
return redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d-%d', floor[1], floor[2]))
