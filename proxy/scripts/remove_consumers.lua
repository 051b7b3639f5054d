-- Delete the consumers of a group that have been idle longer than a bound and hold nothing
-- pending (a dead sidecar's, once its entries were claimed), in one step: a consumer that reads
-- meanwhile cannot lose its new entries (DELCONSUMER drops a consumer's pending list with it).
-- KEYS: log ; ARGV: group, the caller's own consumer name (kept), idle bound in ms
-- Returns how many were deleted.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if consumers.err then return 0 end  -- no such group
local removed = 0
for _, c in ipairs(consumers) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info['name'] ~= ARGV[2] and info['pending'] == 0 and info['idle'] > tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed = removed + 1
  end
end
return removed
