-- Find or make the person of each sighting, and index identifiers not seen before.
-- KEYS[1]: eg:persons:{account}, the person index ("<TYPE>:<value>" -> person id).
-- ARGV: for each sighting in turn: the person id to use if none is known (its own "ID"
-- value if it has one, else a fresh one), the number n of its fields, then its n fields
-- "<TYPE>:<value>", the strongest first.
-- A sighting's person is the one its first known field names, else the candidate. Each
-- unknown field joins that person (HSETNX: a field never changes hands, whoever races),
-- and so does the person's own "ID:<person>" field.
-- Returns, per sighting: its person, then per field the person that field belongs to.
local index = KEYS[1]
local out = {}
local i = 1
while i <= #ARGV do
  local candidate = ARGV[i]
  local n = tonumber(ARGV[i + 1])
  local person = false
  for j = 1, n do
    person = redis.call('HGET', index, ARGV[i + 1 + j])
    if person then break end
  end
  person = person or candidate
  redis.call('HSETNX', index, 'ID:' .. person, person)
  out[#out + 1] = person
  for j = 1, n do
    local field = ARGV[i + 1 + j]
    if redis.call('HSETNX', index, field, person) == 1 then
      out[#out + 1] = person
    else
      out[#out + 1] = redis.call('HGET', index, field)
    end
  end
  i = i + 2 + n
end
return out
