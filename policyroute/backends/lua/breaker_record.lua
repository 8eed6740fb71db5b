-- Record how an admitted call ended (policyroute/resilience/breaker.py), with the
-- semantics of pybreaker: consecutive failures trip a closed breaker at fail_max; any
-- failure re-opens a half-open one; success_threshold successes close it.
-- KEYS as breaker_admit.lua. ARGV: outcome (success|failure|release), generation the
-- call was admitted in, fail_max, success_threshold, trial token (or ''), ttl_ms.
-- An outcome from an earlier generation (the state moved on meanwhile) is ignored.
-- Reply: {state, moved_from}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local outcome, admitted_gen = ARGV[1], tonumber(ARGV[2])
local fail_max, threshold, ttl_ms = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[6])
if ARGV[5] ~= '' then redis.call('ZREM', KEYS[2], ARGV[5]) end
local s = redis.call('HMGET', KEYS[1], 'state', 'gen')
local state = s[1] or 'closed'
local gen = tonumber(s[2]) or 0
if outcome == 'release' or gen ~= admitted_gen then
  return {state, ''}
end
local function open()
  redis.call('HSET', KEYS[1], 'state', 'open', 'gen', gen + 1, 'opened', now, 'successes', 0)
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
  redis.call('DEL', KEYS[2])
end
if state == 'closed' then
  if outcome == 'failure' then
    local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
    if failures >= fail_max then
      open()
      return {'open', 'closed'}
    end
  else
    redis.call('HSET', KEYS[1], 'failures', 0)
  end
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
  return {'closed', ''}
end
if state == 'half-open' then
  if outcome == 'failure' then
    open()
    return {'open', 'half-open'}
  end
  redis.call('HSET', KEYS[1], 'failures', 0)
  local successes = redis.call('HINCRBY', KEYS[1], 'successes', 1)
  if successes >= threshold then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'gen', gen + 1, 'failures', 0, 'successes', 0)
    redis.call('PEXPIRE', KEYS[1], ttl_ms)
    redis.call('DEL', KEYS[2])
    return {'closed', 'half-open'}
  end
  return {'half-open', ''}
end
return {state, ''}
