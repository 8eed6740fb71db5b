-- Before checking a one-time code: is the subject locked out, what is its secret, what time is it.
-- KEYS[1] lock key; KEYS[2] (optional) the subject's secret hash.
-- Returns {lock_ms, secret or nil, seconds, microseconds}; lock_ms <= 0 means not locked.
-- Time comes from Valkey so every worker counts TOTP steps on the same clock.
local now = redis.call('TIME')
local lock = redis.call('PTTL', KEYS[1])
local secret = false
if #KEYS > 1 then
  secret = redis.call('HGET', KEYS[2], 'secret')
end
return {lock, secret, tonumber(now[1]), tonumber(now[2])}
