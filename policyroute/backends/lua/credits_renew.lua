-- Keep the reservations of requests still running (policyroute/steps/credits.py).
-- KEYS[1]: an account's held reservations; ARGV[1]: the hold (ms); ARGV[2..]: members.
-- Each member still held now expires a hold from now; one already settled or swept is
-- not added back (XX). Returns how many were renewed.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expires = now + tonumber(ARGV[1])
local n = 0
for i = 2, #ARGV do
  n = n + redis.call('ZADD', KEYS[1], 'XX', 'CH', expires, ARGV[i])
end
return n
