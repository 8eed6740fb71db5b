-- Shared by scripts that name `-- include: _period` (prepended when loaded).
-- The allowance period a time falls in: hour, day, week or calendar month (UTC).
local function period(now, every)
  local secs = math.floor(now / 1000)
  if every == 'hour' then return tostring(math.floor(secs / 3600)) end
  local days = math.floor(secs / 86400)
  if every == 'day' then return tostring(days) end
  if every == 'week' then return tostring(math.floor((days + 3) / 7)) end
  -- month: civil-from-days (H. Hinnant), so months follow the calendar in UTC
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
