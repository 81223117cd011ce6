-- Index one person under its id and identifiers: all of them, or none.
-- KEYS[1]: eg:persons:{account}, the person index ("<TYPE>:<value>" -> person id).
-- ARGV[1]: the person id; ARGV[2..n]: its fields, the first being "ID:<person id>".
-- Returns {0, ""} if the person is new, {1, ""} if it existed (new fields added), or
-- {2, "<owner>\n<field>"} if a field belongs to another person: then nothing is written.
for i = 2, #ARGV do
  local owner = redis.call('HGET', KEYS[1], ARGV[i])
  if owner and owner ~= ARGV[1] then
    return {2, owner .. '\n' .. ARGV[i]}
  end
end
local existed = redis.call('HEXISTS', KEYS[1], ARGV[2])
for i = 2, #ARGV do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[1])
end
return {existed, ''}
