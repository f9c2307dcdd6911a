-- Consume+ack cycles: each connection consumes one message (GET .../consume?wait=1, the path given to wrk), then
-- acknowledges it (POST /messages/{id}/ack with its lease id) on its next request, and so on.
-- With BENCH_CONSUME_MAX=n (n > 1) a connection consumes up to n at once (POST .../consume {"max": n, "wait": 1},
-- the wait taken from the path's query)
-- and then acknowledges each, one request per ack, before its next consume.
-- wrk calls response() for a connection before it asks request() for that connection's next request, so a
-- delivery's ack is queued in response() and sent by the same connection's next requests.
-- At the end it prints BENCH_RESULT (report.lua) with the deliveries, acks and empty polls counted here.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "auth.lua")
dofile(here .. "report.lua")

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  acks, first, last = {}, 1, 0
  delivered, acked, empty, refused = 0, 0, 0, 0
  ack_headers = {["Content-Type"] = "application/json"}
  local consume_headers = {["Content-Type"] = "application/json"}
  for name, value in pairs(wrk.headers) do
    ack_headers[name] = value
    consume_headers[name] = value
  end
  local max = tonumber(os.getenv("BENCH_CONSUME_MAX") or "1") or 1
  if max > 1 then
    local wait = tonumber(wrk.path:match("[?&]wait=([%d.]+)") or "0")  -- the GET's query, as the POST's body
    consume = wrk.format("POST", nil, consume_headers, string.format('{"max":%d,"wait":%g}', max, wait))
  else
    consume = wrk.format("GET")
  end
end

function request()
  if first <= last then
    local ack = acks[first]
    acks[first] = nil
    first = first + 1
    return wrk.format("POST", "/messages/" .. ack[1] .. "/ack", ack_headers, '{"lease_id":"' .. ack[2] .. '"}')
  end
  return consume
end

function response(status, headers, body)
  if status ~= 200 then
    refused = refused + 1
    return
  end
  local found = 0
  for id, lease in body:gmatch('"message_id":(%d+).-"lease_id":"(%x+)"') do
    last = last + 1
    acks[last] = {id, lease}
    found = found + 1
  end
  if found > 0 then
    delivered = delivered + found
  elseif body:find('acknowledged', 1, true) then
    acked = acked + 1
  else
    empty = empty + 1  -- `null`: nothing was ready within `wait`
  end
end

function counts()
  local total = {delivered = 0, acked = 0, empty = 0, refused = 0}
  for _, thread in ipairs(threads) do
    for name in pairs(total) do
      total[name] = total[name] + thread:get(name)
    end
  end
  return total
end
