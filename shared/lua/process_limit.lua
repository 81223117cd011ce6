-- Processing rate limits (GCRA, a token bucket kept as one time), one bucket per account.
-- KEYS[i]: eg:rl:{account}:process. ARGV, for each key in turn: interval (us per event),
-- tolerance (burst x interval), and n: events that want tokens now; a negative n gives
-- that many back (their batch failed before anything was written).
-- Every one of the n events is charged: those that fit now are written, the others are
-- paid for in advance and written when their time comes. So the bucket's time (TAT, us on
-- Redis's clock) may lie far ahead: later batches queue behind, in order, and an event is
-- never charged twice.
-- Returns per key: {events that fit now, now, the TAT before this charge}. Event i
-- (1-based) of the n is due at max(TAT, now) + i x interval - tolerance.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[3 * i - 2])
  local tolerance = tonumber(ARGV[3 * i - 1])
  local n = tonumber(ARGV[3 * i])
  local stored = tonumber(redis.call('GET', key))
  local tat = math.max(stored or now, now)
  local fit = 0
  local new_tat
  if n >= 0 then
    fit = math.max(0, math.min(n, math.floor((now + tolerance - tat) / interval)))
    new_tat = tat + n * interval
  else
    new_tat = math.max(tat + n * interval, now)
  end
  if new_tat > now then
    redis.call('SET', key, string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
  else
    redis.call('DEL', key)
  end
  out[i] = {fit, now, tat}
end
return out
