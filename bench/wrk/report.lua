-- Loaded by the other scripts: at the end of a run, wrk calls done() once; it prints one line
-- "BENCH_RESULT {json}" that bench/runner.py parses. Latencies are in microseconds, as wrk measures them.
-- A script that defines counts() (returning a table of name -> number) adds those to the line.
function done(summary, latency, requests)
  local e = summary.errors
  local extra = ""
  if counts then
    for name, n in pairs(counts()) do
      extra = extra .. string.format(',"%s":%d', name, n)
    end
  end
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"p999_us":%d,"max_us":%d,"mean_us":%.1f%s}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean, extra))
end
