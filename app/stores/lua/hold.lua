-- hold.lua: make one id held under a lease, wherever a rebuild of Redis left it (a blocking take that straddled
-- the rebuild): out of ready, once in processing, with its lease deadline.
-- KEYS[1] ready list, KEYS[2] processing list, KEYS[3] leases sorted set
-- ARGV[1] id, ARGV[2] lease deadline (ms since epoch)
-- Returns: 1.
redis.call('LREM', KEYS[1], 1, ARGV[1])
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
