-- Admit one call through a shared circuit breaker (policyroute/resilience/breaker.py).
-- KEYS[1]: hash {state, gen, failures, successes, opened}; KEYS[2]: zset of trial slots
-- (token -> lease end, ms). ARGV: reset_ms, half_open_calls, token, lease_ms, ttl_ms.
-- Reply: {verdict, generation, wait_ms, failures, moved_from}; verdict is closed, trial
-- (a half-open slot was taken), busy (every slot is taken) or open. Time is Valkey's, so
-- every worker sees the same open period and the same slots.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local reset_ms, slots = tonumber(ARGV[1]), tonumber(ARGV[2])
local lease_ms, ttl_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local s = redis.call('HMGET', KEYS[1], 'state', 'gen', 'failures', 'opened')
local state = s[1] or 'closed'
local gen = tonumber(s[2]) or 0
local failures = tonumber(s[3]) or 0
local moved_from = ''
if state == 'open' then
  local opens_at = (tonumber(s[4]) or 0) + reset_ms
  if now < opens_at then
    return {'open', gen, opens_at - now, failures, ''}
  end
  state = 'half-open'
  gen = gen + 1
  moved_from = 'open'
  redis.call('HSET', KEYS[1], 'state', state, 'gen', gen, 'successes', 0)
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
  redis.call('DEL', KEYS[2])
end
if state == 'half-open' then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= slots then
    return {'busy', gen, 1000, failures, moved_from}
  end
  redis.call('ZADD', KEYS[2], now + lease_ms, ARGV[3])
  redis.call('PEXPIRE', KEYS[2], lease_ms)
  return {'trial', gen, 0, failures, moved_from}
end
return {'closed', gen, 0, failures, moved_from}
