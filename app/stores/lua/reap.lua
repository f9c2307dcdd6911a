-- reap.lua: move deliveries whose lease ran out back to ready. Atomic, so several broker processes sharing
-- one Redis never move the same id twice.
-- KEYS[1] leases sorted set, KEYS[2] processing list, KEYS[3] ready list
-- ARGV[1] now (ms since epoch), ARGV[2] max ids per call
-- Returns: the ids moved.
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('LREM', KEYS[2], 1, id)
  redis.call('RPUSH', KEYS[3], id)
end
return expired
