-- Release a batch the sink refused as a whole (nothing of it was stored): its events are
-- free to go in other batches (the halves of a bisection) or to the dead letters.
-- KEYS[1..n]: the events' state keys, KEYS[n+1]: the batch record.
-- ARGV[1]: the batch's state ("p:<batch key>"); keys another batch holds are left alone.
local n = #KEYS - 1
for i = 1, n do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
  end
end
redis.call('DEL', KEYS[n + 1])
return n
