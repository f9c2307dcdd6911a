-- release.lua: forget deliveries (after an ack was journaled, or a stale copy was refused by the journal).
-- KEYS[1] processing list, KEYS[2] leases sorted set
-- ARGV ids to remove (one occurrence each from processing, and their lease)
-- Returns: how many processing entries were removed.
local removed = 0
for i = 1, #ARGV do
  removed = removed + redis.call('LREM', KEYS[1], 1, ARGV[i])
  redis.call('ZREM', KEYS[2], ARGV[i])
end
return removed
