-- A balance as the next charge would see it, read only (credits in shadow mode).
-- KEYS: balance hash, held reservations; ARGV: allowance amount, allowance period name.
-- Returns the credits available: balance + allowance (reset when a new period began)
-- + reservations whose hold expired (the next charge refunds them first).
-- Nothing is written: a shadowed credits step never reserves, charges or refunds.
-- include: _period
-- include: _account
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local amount, every = tonumber(ARGV[1]), ARGV[2]

local b, a, p = account(KEYS[1], KEYS[2], now)
if amount > 0 and p ~= period(now, every) then a = amount end
return b + a
