-- The bearer token comes from the environment (BENCH_TOKEN), set by bench/runner.py after it logged in.
local token = os.getenv("BENCH_TOKEN")
if token and token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end
