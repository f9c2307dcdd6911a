-- swap.lua: replace a queue's structures with the ones a reconciliation rebuilt, all at once.
-- KEYS[1..4] ready, processing, leases, delayed; KEYS[5..8] the rebuilt ones, in the same order
-- ARGV none
-- Returns: 1.
for i = 1, 4 do
  if redis.call('EXISTS', KEYS[i + 4]) == 1 then
    redis.call('RENAME', KEYS[i + 4], KEYS[i])
  else
    redis.call('DEL', KEYS[i])
  end
end
return 1
