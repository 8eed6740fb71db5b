-- Re-queue outbox entries with a new attempt count and error, at the end of a stream.
-- KEYS[1] = outbox stream, KEYS[2] = target (the outbox itself to retry, or the parked stream).
-- ARGV: group, then (id, attempts, error) per entry.
local key, target, group = KEYS[1], KEYS[2], ARGV[1]
for i = 2, #ARGV, 3 do
  local id = ARGV[i]
  local found = redis.call('XRANGE', key, id, id)
  if #found > 0 then
    local fields, out = found[1][2], {}
    for j = 1, #fields, 2 do
      local name, value = fields[j], fields[j + 1]
      if name == 'attempts' then value = ARGV[i + 1] elseif name == 'error' then value = ARGV[i + 2] end
      out[#out + 1] = name
      out[#out + 1] = value
    end
    redis.call('XADD', target, '*', unpack(out))
  end
  redis.call('XACK', key, group, id)
  redis.call('XDEL', key, id)
end
return redis.call('XLEN', key)
