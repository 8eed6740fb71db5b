-- Shared by the credits scripts (`-- include: _account`, prepended when loaded).
-- An account as the next charge sees it: granted balance b, allowance left a, its period
-- p, plus the reservations whose hold expired by `now` (a process died before settling
-- them), which go back first. Returns b, a, p and those reservations' members
-- ('from_a:from_b:period:token', scored by expiry); allowance comes back only within the
-- period it was taken from. What a charge sweeps is remembered (member scored by when it
-- is forgotten) for SWEPT_KEPT ms in the account's `:swept` set.
local SWEPT_KEPT = 86400000
local function account(balance_key, held_key, now)
  local s = redis.call('HMGET', balance_key, 'b', 'a', 'p')
  local b = tonumber(s[1]) or 0
  local a = tonumber(s[2]) or 0
  local p = s[3] or ''
  local lost = redis.call('ZRANGEBYSCORE', held_key, '-inf', now, 'LIMIT', 0, 64)
  for _, m in ipairs(lost) do
    local ra, rb, rp = string.match(m, '^(%d+):(%d+):([^:]*):')
    if rb then
      b = b + tonumber(rb)
      if rp == p then a = a + tonumber(ra) end
    end
  end
  return b, a, p, lost
end
