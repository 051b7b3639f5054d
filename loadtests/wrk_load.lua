-- wrk script of the benchmark (loadtests/wrkload.py builds the command line):
--   wrk ... -s loadtests/wrk_load.lua <url> -- METHOD PATH KEYS BODY ID_PREFIX LIMIT
-- PATH may hold {k}: request number % KEYS (the thread it goes to). BODY ("" for none) may
-- hold {n}: a message id unique to this run (ID_PREFIX, the wrk thread, the request number),
-- so idempotency keys never collide between requests, threads or runs. LIMIT > 0 stops each
-- wrk thread after that many answers (a backlog of a given size) and prints "wrk-limit";
-- 0 runs for -d.
-- At the end it prints one line "wrk-result {json}" with counts and latency percentiles (us).

local threads = {}

function setup(thread)
  thread:set("thread_number", #threads)
  table.insert(threads, thread)
end

local method, path, keys, body, prefix, limit
local sent, answered = 0, 0

local function plain(text)
  -- gsub treats % in a replacement as an escape: keep the text literal
  return (text:gsub("%%", "%%%%"))
end

function init(args)
  method, path, keys = args[1], args[2], tonumber(args[3])
  body = args[4] ~= "" and args[4] or nil
  prefix = plain(args[5] .. "-" .. thread_number .. "-")
  limit = tonumber(args[6])
  if limit > 0 then
    -- Defined only when needed: a response() callback makes wrk hand every answer to Lua.
    response = function(status, headers, answer)
      answered = answered + 1
      if answered == limit then
        io.write("wrk-limit\n")  -- wrk runs for -d: the harness interrupts it once all are done
        io.flush()
        wrk.thread:stop()
      end
    end
  end
end

function request()
  sent = sent + 1
  local target = path:gsub("{k}", tostring(sent % keys))
  local payload = body and body:gsub("{n}", prefix .. sent) or nil
  return wrk.format(method, target, nil, payload)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'wrk-result {"requests": %d, "duration_us": %d, "connect_errors": %d, ' ..
    '"read_errors": %d, "write_errors": %d, "status_errors": %d, "timeout_errors": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d, "max_us": %d, ' ..
    '"mean_us": %.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
