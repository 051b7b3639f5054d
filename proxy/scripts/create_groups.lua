-- Create every consumer group of a shard's log at 0 (MKSTREAM), in one step: a sidecar killed
-- while creating them can never leave a group missing that a trim would then ignore.
-- KEYS: log ; ARGV: every configured group. A group that exists already is kept as it is.
-- Returns how many groups were created.
local created = 0
for _, group in ipairs(ARGV) do
  local ok = redis.pcall('XGROUP', 'CREATE', KEYS[1], group, '0', 'MKSTREAM')
  if type(ok) == 'table' and ok.err then
    if not string.find(ok.err, 'BUSYGROUP', 1, true) then return redis.error_reply(ok.err) end
  else
    created = created + 1
  end
end
return created
