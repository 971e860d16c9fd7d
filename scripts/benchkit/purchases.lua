-- wrk script for scripts/bench: POST /api/v1/verifications (a purchase), a unique id per request.
--
-- Environment (read once per wrk thread):
--   BENCH_API_KEY    the X-API-Key to send (required)
--   BENCH_USER_LO/HI random user ids in [LO, HI] (numeric, as benchkit.harness seeds them)
--   BENCH_TIMEOUT_S  the verifications' timeout_seconds
--   BENCH_ID_PREFIX  prefix of the verification ids (unique per load run)
-- At the end it prints one line "BENCH_RESULT {json}" that benchkit.harness parses.

local threads = {}
local counter = 0

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  key = os.getenv("BENCH_API_KEY")
  lo = tonumber(os.getenv("BENCH_USER_LO") or "1000001")
  hi = tonumber(os.getenv("BENCH_USER_HI") or "1001000")
  timeout = os.getenv("BENCH_TIMEOUT_S") or "300"
  prefix = os.getenv("BENCH_ID_PREFIX") or "b"
  math.randomseed(os.time() * 1000 + tid)
  headers = {["Content-Type"] = "application/json", ["X-API-Key"] = key}
end

function request()
  counter = counter + 1
  local user = tostring(math.random(lo, hi))
  local body = string.format(
    '{"id":"%s-%d-%d","user_id":"%s","service_name":"WhatsApp","country":"US",' ..
    '"cost_cents":1,"timeout_seconds":%s}', prefix, tid, counter, user, timeout)
  return wrk.format("POST", "/api/v1/verifications", headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"errors_connect":%d,"errors_read":%d,' ..
    '"errors_write":%d,"errors_status":%d,"errors_timeout":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
