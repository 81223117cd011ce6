-- Add a dead-letter entry, once: an entry id is made from its sink and events, so the same
-- events failing again on the same sink (a retried job, a replay that fails, a producer's
-- resend) update the entry instead of adding a second copy of them.
-- KEYS[1]: the entry hash, KEYS[2]: the entry index (sorted set), KEYS[3]: the account's
-- counters hash.
-- ARGV[1]: entry id, ARGV[2]: now (epoch seconds), ARGV[3]: count of events,
-- ARGV[4]: '1' if counted in the account's counters, ARGV[5]: attempts to add,
-- ARGV[6]: '1' if, when the entry exists, these events are another copy to count (a resend,
-- counted as duplicate), '0' if they are the entry's own (a retry, a replay),
-- then field, value pairs: set on a new entry; on an existing one only last_failure,
-- reason and kind are updated.
-- Returns 1 if the entry is new, 0 if it existed.
local counted = ARGV[4] == '1'
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'attempts', ARGV[5])
  for i = 7, #ARGV, 2 do
    local field = ARGV[i]
    if field == 'last_failure' or field == 'reason' or field == 'kind' then
      redis.call('HSET', KEYS[1], field, ARGV[i + 1])
    end
  end
  if counted and ARGV[6] == '1' then
    redis.call('HINCRBY', KEYS[3], 'duplicate', ARGV[3])
  end
  return 0
end
for i = 7, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('HSET', KEYS[1], 'attempts', ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if counted then
  redis.call('HINCRBY', KEYS[3], 'dead_lettered', ARGV[3])
end
return 1
