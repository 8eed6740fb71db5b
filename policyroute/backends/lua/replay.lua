-- One-time tokens (policyroute/steps/replay.py): a token's jti is taken once, or given back.
-- KEYS[1] the jti's record; ARGV[1] 'take' or 'back'; ARGV[2] the taking request's id;
-- ARGV[3] how long the record lives (ms): until the token can no longer be accepted.
-- 'take' returns 1 when this request took the jti, 0 when it was taken before.
if ARGV[1] == 'take' then
  if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[3]) then return 1 end
  return 0
end
-- 'back': only the request that took it gives it back
if redis.call('GET', KEYS[1]) == ARGV[2] then redis.call('DEL', KEYS[1]) end
return 1
