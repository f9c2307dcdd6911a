-- take.lua: hand up to N ready ids to one consumer, each under a lease.
-- KEYS[1] ready list, KEYS[2] processing list, KEYS[3] leases sorted set (score: deadline, ms since epoch)
-- ARGV[1] max ids to take (integer >= 1), ARGV[2] lease deadline (ms since epoch)
-- Returns: the ids taken, oldest first (possibly empty).
local taken = {}
for _ = 1, tonumber(ARGV[1]) do
  local id = redis.call('RPOPLPUSH', KEYS[1], KEYS[2])
  if not id then break end
  redis.call('ZADD', KEYS[3], ARGV[2], id)
  taken[#taken + 1] = id
end
return taken
