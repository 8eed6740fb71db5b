-- Record one one-time-code attempt atomically (RFC 6238 section 5.2: a code is accepted once).
-- KEYS[1] last accepted time step; KEYS[2] failure count; KEYS[3] lock.
-- ARGV[1] the time step the code matched, or -1 when it matched none
-- ARGV[2] failures that lock the subject out; ARGV[3] window of the failure count (ms)
-- ARGV[4] lockout (ms); ARGV[5] how long the last accepted step is remembered (ms)
-- Returns {1, 0} accepted; {0, failures} rejected; {2, failures} replayed; {-1, lock_ms} locked.
local lock = redis.call('PTTL', KEYS[3])
if lock > 0 then
  return {-1, lock}
end
local step = tonumber(ARGV[1])
local outcome = 0
if step >= 0 then
  local last = tonumber(redis.call('GET', KEYS[1]) or '-1')
  if step > last then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[5])
    redis.call('DEL', KEYS[2])
    return {1, 0}
  end
  outcome = 2
end
local failures = redis.call('INCR', KEYS[2])
if failures == 1 then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
if failures >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[4])
  redis.call('DEL', KEYS[2])
  return {-1, tonumber(ARGV[4])}
end
return {outcome, failures}
