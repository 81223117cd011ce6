-- Put a job that a worker popped but never started back at the head of its queue.
-- KEYS[1]: the queue's intermediate list, KEYS[2]: the queue list; ARGV[1]: the job id.
-- Returns 1 if requeued, 0 if it had left the intermediate list meanwhile (a live worker
-- started it), so a job is never queued twice by this script.
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
