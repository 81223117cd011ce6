-- Remove a dead-letter entry, once: after a replay wrote its events (they leave the
-- account's dead_lettered for persisted and duplicate) or on purge (counters untouched:
-- purged events stay counted as dead-lettered, so the account's figures still add up).
-- KEYS[1]: the entry hash, KEYS[2]: the entry index, KEYS[3]: the account's counters hash.
-- ARGV[1]: entry id, ARGV[2]: '1' for a replay, '0' for a purge, ARGV[3]: events new in
-- the sink, ARGV[4]: events it already had.
-- Returns 1 if removed, 0 if it was gone already (another replay or purge won).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local counted = redis.call('HGET', KEYS[1], 'counted')
local count = tonumber(redis.call('HGET', KEYS[1], 'count') or '0')
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[2] == '1' and counted == '1' then
  redis.call('HINCRBY', KEYS[3], 'dead_lettered', -count)
  redis.call('HINCRBY', KEYS[3], 'persisted', ARGV[3])
  redis.call('HINCRBY', KEYS[3], 'duplicate', ARGV[4])
end
return 1
