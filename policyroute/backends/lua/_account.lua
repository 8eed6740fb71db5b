-- Shared by the credits scripts (`-- include: _account`, prepended when loaded).
-- An account as the next charge sees it: granted balance b, allowance left a, its period
-- p, plus the reservations whose hold expired by `now` (a process died before settling
-- them), which go back first. Returns b, a, p and those reservations' members
-- ('from_a:from_b:period:token', scored by expiry; nil when the held set was not
-- searched); allowance comes back only within the
-- period it was taken from. What a charge sweeps is remembered (member scored by when it
-- is forgotten) for SWEPT_KEPT ms in the account's `:swept` set.
-- The account's field `n` is a bound the charges keep: no hold expires before it (NONE_HELD
-- when none is held). The held set is searched only once `n` has passed, or when the
-- account has no `n` (written by an earlier version): most charges skip that search. Also
-- returned: the bound read (nil once it has passed: the caller finds the next one) and
-- whether the account exists.
local SWEPT_KEPT = 86400000
local NONE_HELD = 9007199254740991
local function account(balance_key, held_key, now)
  local s = redis.call('HMGET', balance_key, 'b', 'a', 'p', 'n')
  local b = tonumber(s[1]) or 0
  local a = tonumber(s[2]) or 0
  local p = s[3] or ''
  local due = tonumber(s[4])
  local lost = nil
  if not due or due <= now then
    lost = redis.call('ZRANGEBYSCORE', held_key, '-inf', now, 'LIMIT', 0, 64)
    for _, m in ipairs(lost) do
      local ra, rb, rp = string.match(m, '^(%d+):(%d+):([^:]*):')
      if rb then
        b = b + tonumber(rb)
        if rp == p then a = a + tonumber(ra) end
      end
    end
    due = nil
  end
  return b, a, p, lost, due, (s[1] or s[2] or s[3] or s[4]) and true or false
end
