-- requeue.lua: put delivered ids back at the front of the line (nack with requeue, or a delivery the journal
-- could not record). Always pushes: a duplicate id is refused later by the journal, a missing one is lost work.
-- KEYS[1] processing list, KEYS[2] leases sorted set, KEYS[3] ready list
-- ARGV ids to requeue
-- Returns: how many ids were pushed.
for i = 1, #ARGV do
  redis.call('LREM', KEYS[1], 1, ARGV[i])
  redis.call('ZREM', KEYS[2], ARGV[i])
  redis.call('RPUSH', KEYS[3], ARGV[i])
end
return #ARGV
