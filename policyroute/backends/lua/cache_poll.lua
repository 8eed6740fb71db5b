-- A stampede waiter's look: the stored response, or whether the leader still holds the lock.
local s = redis.call('HMGET', KEYS[1], 'code', 'hd', 'bd')
if s[1] then return {'hit', s[1], s[2], s[3]} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'locked'} end
return {'free'}
