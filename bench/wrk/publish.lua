-- POST the JSON body in the file BENCH_BODY_FILE (one message, or a batch) with the bearer token of auth.lua.
-- wrk builds the request once from wrk.method/headers/body, so the script costs nothing per request.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "auth.lua")
dofile(here .. "report.lua")

local path = assert(os.getenv("BENCH_BODY_FILE"), "BENCH_BODY_FILE is not set")
local file = assert(io.open(path, "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"
