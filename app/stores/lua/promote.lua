-- promote.lua: move delayed ids that are due to the back of the ready line. Atomic, so several broker processes
-- never move one id twice.
-- KEYS[1] delayed sorted set (score: due time, ms since epoch), KEYS[2] ready list
-- ARGV[1] now (ms since epoch), ARGV[2] max ids per call
-- Returns: the ids moved.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('LPUSH', KEYS[2], id)
end
return due
