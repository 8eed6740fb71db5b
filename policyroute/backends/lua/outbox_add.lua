-- Append events to the outbox stream. KEYS[1] = stream.
-- ARGV: groups of 8 values, one group per event:
--   route, topic, dlq ('' = none), max_attempts, attempts, error, sealed ('1'/'0'), event
for i = 1, #ARGV, 8 do
  redis.call('XADD', KEYS[1], '*',
    'route', ARGV[i], 'topic', ARGV[i + 1], 'dlq', ARGV[i + 2],
    'max_attempts', ARGV[i + 3], 'attempts', ARGV[i + 4], 'error', ARGV[i + 5],
    'sealed', ARGV[i + 6], 'event', ARGV[i + 7])
end
return redis.call('XLEN', KEYS[1])
