-- A balance as the next charge would see it, read only (credits in shadow mode).
-- KEYS: balance hash, held reservations; ARGV: allowance amount, allowance period name.
-- Returns the credits available: balance + allowance (reset when a new period began)
-- + reservations whose hold expired (the next charge refunds them first).
-- Nothing is written: a shadowed credits step never reserves, charges or refunds.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local amount, every = tonumber(ARGV[1]), ARGV[2]

local function period()
  local secs = math.floor(now / 1000)
  if every == 'hour' then return tostring(math.floor(secs / 3600)) end
  local days = math.floor(secs / 86400)
  if every == 'day' then return tostring(days) end
  if every == 'week' then return tostring(math.floor((days + 3) / 7)) end
  -- month: civil-from-days (H. Hinnant), as in state.lua
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return tostring(y * 12 + m - 1)
end

local s = redis.call('HMGET', KEYS[1], 'b', 'a', 'p')
local b = tonumber(s[1]) or 0
local a = tonumber(s[2]) or 0
local p = s[3] or ''
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 64)) do
  local ra, rb, rp = string.match(m, '^(%d+):(%d+):([^:]*):')
  if rb then
    b = b + tonumber(rb)
    if rp == p then a = a + tonumber(ra) end
  end
end
if amount > 0 and p ~= period() then a = amount end
return b + a
