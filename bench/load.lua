-- wrk script for bench/run.sh: one request shape per run, chosen by environment variables, and a done()
-- that prints one machine-readable RESULT line (wrk's own summary has no p99.9).
--
--   BENCH_PATH     request path (POST), e.g. /openApi/runJob
--   BENCH_KEYS     none | unique | fixed
--                  unique: every request has its own payload (and key header, if BENCH_KEY_HEADER is set);
--                  fixed: every request is the same, with one fixed key header value
--   BENCH_KEY_HEADER  header carrying the key (Idempotency-Key / idempotency-key), or empty for none
--   BENCH_NONCE    makes this run's payloads and keys distinct from any earlier run's

local path = os.getenv("BENCH_PATH") or "/openApi/fetchInstanceStatus"
local keys = os.getenv("BENCH_KEYS") or "none"
local key_header = os.getenv("BENCH_KEY_HEADER") or ""
local nonce = os.getenv("BENCH_NONCE") or tostring(os.time())

local threads = {}

function setup(thread)
  thread:set("thread_id", #threads + 1)
  table.insert(threads, thread)
end

local counter = 0
local fixed_request

local function form(params)
  return "appId=1&jobId=" .. params.job .. "&instanceParams=" .. params.instance .. "&delay=0"
end

function init(args)
  local headers = { ["Content-Type"] = "application/x-www-form-urlencoded" }
  if keys == "fixed" then
    if key_header ~= "" then
      headers[key_header] = "bench-" .. nonce
    end
    fixed_request = wrk.format("POST", path, headers, form({ job = 1, instance = "bench-" .. nonce }))
  elseif keys == "none" then
    fixed_request = wrk.format("POST", path, headers, "appId=1&instanceId=754612332134400064")
  end
end

function request()
  if fixed_request then
    return fixed_request
  end
  counter = counter + 1
  local unique = nonce .. "-" .. thread_id .. "-" .. counter
  local headers = { ["Content-Type"] = "application/x-www-form-urlencoded" }
  if key_header ~= "" then
    headers[key_header] = unique
  end
  return wrk.format("POST", path, headers, form({ job = 1, instance = unique }))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d p999_us=%d connect=%d read=%d write=%d timeout=%d status=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    e.connect, e.read, e.write, e.timeout, e.status))
end
