-- Claim events for a batch about to be sent to a sink without a unique key (a forward
-- target, a file), before it is sent: a retry then sends the very same batch again, with
-- the same idempotency key, whatever other jobs ride along by then.
-- KEYS[1..n]: the events' state keys (keys.forwarded), KEYS[n+1]: the batch record.
-- ARGV[1]: this batch's state ("p:<batch key>"), ARGV[2]: TTL seconds, ARGV[3]: the
-- batch's events (msgpack), kept until the sink acknowledges them.
-- All keys must be unset or already this batch's (a retry): then all are set and the
-- batch stored; otherwise nothing changes (another batch holds some: in flight elsewhere,
-- or delivered).
-- Returns the 1-based indexes of the keys another batch holds; empty when claimed.
local n = #KEYS - 1
local taken = {}
for i = 1, n do
  local state = redis.call('GET', KEYS[i])
  if state and state ~= ARGV[1] then
    taken[#taken + 1] = i
  end
end
if #taken > 0 then
  return taken
end
for i = 1, n do
  redis.call('SET', KEYS[i], ARGV[1], 'EX', ARGV[2])
end
redis.call('SET', KEYS[n + 1], ARGV[3], 'EX', ARGV[2])
return taken
