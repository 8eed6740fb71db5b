-- One request's stateful pre-checks in one round trip (policyroute/steps/state.py).
-- ARGV is a list of ops, each an opcode and its arguments; KEYS follow the same order.
-- Order: rate limits (all or nothing), credits (checked now, taken last), idempotency,
-- cache. The first refusal returns at once, so later ops consume nothing (a short balance
-- waits until idempotency and cache could answer without the handler); credits are
-- taken only when the handler will run (never for a replay or a cache hit).
-- include: _period
-- include: _account
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ki, ai = 1, 1
local function key() local v = KEYS[ki]; ki = ki + 1; return v end
local function arg() local v = ARGV[ai]; ai = ai + 1; return v end
local function num() return tonumber(arg()) end

local function token_bucket(k, cap, refill, per, cost)
  local s = redis.call('HMGET', k, 't', 'ts')
  local tokens = tonumber(s[1]) or cap
  local ts = tonumber(s[2]) or now
  local rate = refill / per
  if now > ts then tokens = math.min(cap, tokens + (now - ts) * rate) end
  local ok = tokens >= cost
  local left = tokens
  if ok then left = tokens - cost end
  local retry = 0
  if not ok then retry = math.ceil((cost - tokens) / rate) end
  local full = math.ceil((cap - left) / rate)
  local write = function()
    redis.call('HSET', k, 't', tostring(left), 'ts', now)
    redis.call('PEXPIRE', k, math.max(full, 1))
  end
  return ok, math.floor(left + 1e-9), full, retry, write, math.floor(tokens + 1e-9)
end

local function sliding_window(k, cap, per, cost)
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now - per)
  local n = redis.call('ZCARD', k)
  local ok = n + cost <= cap
  local retry = 0
  if not ok then
    local i = n + cost - cap - 1
    local e = redis.call('ZRANGE', k, i, i, 'WITHSCORES')
    retry = tonumber(e[2]) + per - now
  end
  local used = n
  if ok then used = n + cost end
  local oldest = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
  local reset = per
  if oldest[2] then reset = tonumber(oldest[2]) + per - now end
  local write = function()
    local now_us = t[1] .. string.format('%06d', tonumber(t[2]))
    for i = 1, cost do redis.call('ZADD', k, now, now_us .. ':' .. (n + i)) end
    redis.call('PEXPIRE', k, per)
  end
  return ok, cap - used, reset, retry, write, cap - n
end

local function concurrency(k, cap, lease, token)
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
  local n = redis.call('ZCARD', k)
  local ok = n < cap
  local left = cap - n
  if ok then left = left - 1 end
  local write = function()
    redis.call('ZADD', k, now + lease, token)
    redis.call('PEXPIRE', k, lease)
  end
  return ok, left, 0, 1000, write, cap - n
end

local limits = {}
local writes = {}
local denied = false
local op = arg()
while op == 'tb' or op == 'sw' or op == 'cc' do
  local ok, left, reset, retry, write, cur
  if op == 'tb' then
    ok, left, reset, retry, write, cur = token_bucket(key(), num(), num(), num(), num())
  elseif op == 'sw' then
    ok, left, reset, retry, write, cur = sliding_window(key(), num(), num(), num())
  else
    ok, left, reset, retry, write, cur = concurrency(key(), num(), num(), arg())
  end
  limits[#limits + 1] = {ok and 1 or 0, left, reset, retry, cur}
  writes[#writes + 1] = write
  if not ok then denied = true end
  op = arg()
end
if denied then
  -- nothing was taken: report what each limit has now
  for _, row in ipairs(limits) do row[2] = row[5] end
  return {'rate', limits, {}, {}}
end
for _, w in ipairs(writes) do w() end

local credit = {}
local take = nil
-- A short balance is answered only after idempotency and cache had their say: a replay
-- or a cache hit costs nothing, so it must not be refused for want of credits.
local short = nil
if op == 'cr' then
  local k, held = key(), key()
  local cost, amount, every, hold, token = num(), num(), arg(), num(), arg()
  local b, a, p, lost = account(k, held, now)
  if #lost > 0 then
    redis.call('ZREM', held, unpack(lost))
    redis.call('HSET', k, 'b', b, 'a', a, 'p', p)
  end
  if amount > 0 then
    local cur = period(now, every)
    if p ~= cur then a = amount; p = cur end
  end
  if b + a < cost then
    short = {'credits', limits, {0, 0, b + a, p}, {}}
  else
    local from_a = math.min(a, cost)
    local from_b = cost - from_a
    credit = {from_a, from_b, b + a - cost, p}
    take = function()
      redis.call('HSET', k, 'b', b - from_b, 'a', a - from_a, 'p', p)
      -- An empty set is removed by the server, so settled accounts keep no extra key.
      redis.call('ZADD', held, now + hold, from_a .. ':' .. from_b .. ':' .. p .. ':' .. token)
    end
  end
  op = arg()
end

local verdict = 'go'
local answer = {}
if op == 'id' then
  local k = key()
  local fp, lock = arg(), num()
  local s = redis.call('HMGET', k, 'fp', 'st', 'code', 'hd', 'bd')
  if not s[1] then
    if short then return short end
    redis.call('HSET', k, 'fp', fp, 'st', '0')
    redis.call('PEXPIRE', k, lock)
  elseif s[1] ~= fp then
    return {'reused', limits, {}, {}}
  elseif s[2] == '0' then
    return {'inflight', limits, {}, {}}
  else
    return {'replay', limits, {}, {s[3], s[4], s[5]}}
  end
  op = arg()
end

if op == 'ca' then
  local v, lk = key(), key()
  local lock, token = num(), arg()
  local s = redis.call('HMGET', v, 'code', 'hd', 'bd')
  if s[1] then
    -- an idempotency record opened above is completed by finish.lua with this answer
    return {'hit', limits, {}, {s[1], s[2], s[3]}}
  end
  if short then return short end
  if not redis.call('SET', lk, token, 'NX', 'PX', lock) then verdict = 'wait' end
  op = arg()
end

if short then return short end
if take then take() end
return {verdict, limits, credit, answer}
