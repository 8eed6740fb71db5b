-- Shared by state.lua's general loop and its one-bucket path (`-- include: _bucket`).
-- One token bucket as a request finds it. The bucket is one string, "tokens at" (ms),
-- with its expiry: one read here, one write by the caller once every limit allows.
-- Returns whether `cost` tokens are there, the tokens left after taking them (floored),
-- the ms until the bucket is full again, the ms until `cost` tokens are there (0 when
-- they are), the tokens there now (floored), the value to store when taken and its
-- expiry (ms).
-- `now` may be a little behind the stamp another worker wrote (each reads Valkey's clock
-- off its own, backends/clock.py): the bucket then has what it had at its stamp, and the
-- stamp never goes back, so no span of time is refilled twice.
local function bucket(k, cap, refill, per, cost, now)
  local tokens, ts = cap, now
  local v = redis.call('GET', k)
  if v then
    local sp = string.find(v, ' ', 1, true)
    tokens = tonumber(string.sub(v, 1, sp - 1)) or cap
    ts = tonumber(string.sub(v, sp + 1)) or now
  end
  local rate = refill / per
  if now > ts then
    tokens = math.min(cap, tokens + (now - ts) * rate)
    ts = now
  end
  local ok = tokens >= cost
  local rest = tokens
  if ok then rest = tokens - cost end
  local retry = 0
  if not ok then retry = math.ceil((cost - tokens) / rate) + ts - now end
  local reset = math.ceil((cap - rest) / rate) + ts - now
  return ok, math.floor(rest + 1e-9), reset, retry, math.floor(tokens + 1e-9),
    string.format('%.14g %d', rest, ts), math.max(reset, 1)
end
