-- Publish an ephemeral event (typing, a reply streamed token by token) to the thread's
-- subscribers on every sidecar, within the thread's rate (GCRA). Nothing of the event is
-- stored or logged: it is only PUBLISHed.
-- KEYS: thread, ephemeral rate (the GCRA theoretical arrival time, Unix ms)
-- ARGV: channel, frame, interval_ms (1000 / ephemeral.rate_per_s), burst
-- Returns {'OK'}; {'MISS'} (thread not in Redis); {'GONE'} (thread deleted); {'RATE', ms}
-- (over the rate: allowed again in ms). Only OK writes (the rate key) and publishes.
redis.replicate_commands()  -- TIME before a write: replicate effects (the default since 5.0)
local th = redis.call('HMGET', KEYS[1], 'seq', 'del')
if not th[1] then return {'MISS'} end
if th[2] == '1' then return {'GONE'} end
-- Redis's clock, not the sidecars': every sidecar meters the thread against one clock.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval, burst = tonumber(ARGV[3]), tonumber(ARGV[4])
local tat = math.max(tonumber(redis.call('GET', KEYS[2]) or '0'), now)
local early = tat + interval - interval * burst - now
if early > 0 then return {'RATE', math.ceil(early)} end
redis.call('SET', KEYS[2], string.format('%.3f', tat + interval), 'PX',
  math.ceil(tat + interval - now))
redis.call('PUBLISH', ARGV[1], ARGV[2])
return {'OK'}
