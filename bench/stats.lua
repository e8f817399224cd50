-- bench/stats.lua — wrk script used for every wrk run of bench/load.sh.
-- Counts responses by status (per thread, summed in done()) and prints one
-- machine-readable line:
--   WRK_RESULT requests=N duration_us=N p50_us=N p90_us=N p99_us=N
--              p999_us=N max_us=N connect=N read=N write=N timeout=N
--              non2xx3xx=N codes=200:N,403:N
-- The response() hook costs wrk a little throughput; it is used for all
-- cases alike, so the cases stay comparable.

counts = {}
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end

function done(summary, latency, requests)
  local agg = {}
  for _, t in ipairs(threads) do
    local c = t:get("counts")
    if c then
      for code, n in pairs(c) do
        agg[code] = (agg[code] or 0) + n
      end
    end
  end
  local keys = {}
  for code in pairs(agg) do table.insert(keys, code) end
  table.sort(keys)
  local parts = {}
  for _, code in ipairs(keys) do
    table.insert(parts, string.format("%d:%d", code, agg[code]))
  end
  local codes = table.concat(parts, ",")
  if codes == "" then codes = "none" end
  local e = summary.errors
  io.write(string.format(
    "WRK_RESULT requests=%d duration_us=%d p50_us=%d p90_us=%d p99_us=%d p999_us=%d max_us=%d connect=%d read=%d write=%d timeout=%d non2xx3xx=%d codes=%s\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max,
    e.connect, e.read, e.write, e.timeout, e.status, codes))
end
