-- defer.lua: take delivered ids out of processing and schedule them for later (nack with a delay).
-- KEYS[1] processing list, KEYS[2] leases sorted set, KEYS[3] delayed sorted set
-- ARGV pairs: id, due time (ms since epoch), id, due time, ...
-- Returns: how many ids were scheduled.
for i = 1, #ARGV, 2 do
  redis.call('LREM', KEYS[1], 1, ARGV[i])
  redis.call('ZREM', KEYS[2], ARGV[i])
  redis.call('ZADD', KEYS[3], ARGV[i + 1], ARGV[i])
end
return #ARGV / 2
