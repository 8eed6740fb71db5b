-- Forget relayed outbox entries. KEYS[1] = stream. ARGV: group, id, id, ...
local key, group = KEYS[1], ARGV[1]
for i = 2, #ARGV do
  redis.call('XACK', key, group, ARGV[i])
  redis.call('XDEL', key, ARGV[i])
end
return redis.call('XLEN', key)
