-- Request rate limits (GCRA, a token bucket kept as one time) for a group of requests:
-- each is admitted if every bucket it takes from has a token, taking one from each; else it
-- takes none and is counted.
-- KEYS: the distinct buckets of the group (eg:rl:{account}:api:<dialect>, and
-- eg:rl:{account}:key:<id> for keys with a limit), then the distinct counters hashes
-- (eg:count:{account}).
-- ARGV[1]: n, the number of buckets; ARGV[2b], ARGV[2b+1]: bucket b's interval (us per
-- token) and tolerance (burst x interval); then one per request, in order: "c b1 [b2]", its
-- counters hash (0-based, after the buckets) and its buckets (1-based).
-- A bucket holds its theoretical arrival time (TAT, us on Redis's clock, the one clock every
-- front door shares): full when TAT <= now, empty when TAT - now > tolerance - interval.
-- Returns per request: allowed (1/0), remaining tokens, us until full, us until a token
-- (0 if allowed), and which of its buckets (1-based) those figures are of: the one with the
-- fewest tokens left.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local tats, dirty, refused, out = {}, {}, {}, {}

local function tat_of(b)
  if tats[b] == nil then
    tats[b] = math.max(tonumber(redis.call('GET', KEYS[b])) or now, now)
  end
  return tats[b]
end

for r = 2 + 2 * n, #ARGV do
  local idx = {}
  for i in string.gmatch(ARGV[r], '%d+') do
    idx[#idx + 1] = tonumber(i)
  end
  local allowed, retry, best, remaining, reset = 1, 0, 1, math.huge, 0
  local new = {}
  for j = 2, #idx do
    local b = idx[j]
    local interval, tolerance = tonumber(ARGV[2 * b]), tonumber(ARGV[2 * b + 1])
    local tat = tat_of(b)
    new[j] = tat + interval
    local wait = new[j] - tolerance - now
    local left, full
    if wait > 0 then
      allowed = 0
      retry = math.max(retry, wait)
      left, full = 0, tat - now
    else
      left, full = math.floor((tolerance - (new[j] - now)) / interval), new[j] - now
    end
    if left < remaining or (left == remaining and full > reset) then
      best, remaining, reset = j - 1, left, full
    end
  end
  if allowed == 1 then
    for j = 2, #idx do
      tats[idx[j]] = new[j]
      dirty[idx[j]] = true
    end
  else
    local c = n + 1 + idx[1]
    refused[c] = (refused[c] or 0) + 1
  end
  out[#out + 1] = {allowed, remaining, reset, retry, best}
end

for b in pairs(dirty) do
  redis.call('SET', KEYS[b], string.format('%.0f', tats[b]),
    'PX', math.ceil((tats[b] - now) / 1000) + 1)
end
for c, count in pairs(refused) do
  redis.call('HINCRBY', KEYS[c], 'rate_limited', count)
end
return out
