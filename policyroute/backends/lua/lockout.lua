-- Brute-force lockout (policyroute/identity/lockout.py), on Valkey time.
-- ARGV: op ('check', 'try', 'done', 'fail'), sides ('a', 's' or 'as'), failures, per (ms),
-- block (ms), lease (ms), attempt id, client address, whether the attempt holds a mark ('1').
-- KEYS: with 'a' the address side's keys (block, failures, attempts), then with 's' the
-- subject side's (failures, addresses that failed, hot, blocked addresses, marks).
-- The address side blocks an address for everyone; the subject side blocks a subject only
-- at the addresses that failed for it (`hot`: the subject reached `failures` and keeps
-- failing; while hot, an address that fails for it is blocked for it at once, and each
-- address may have one attempt for it in flight: its mark).
-- An attempt is counted while in flight (the address's attempts), so however many arrive
-- at once, no more than `failures` are ever evaluated before the block.
-- Returns {code, ms, marked}: code 0 free, 1 blocked for ms, 2 busy (as many attempts in
-- flight as failures allowed; retry after ms); for 'fail', code 1 when the caller is now
-- blocked (ms: the block).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op, sides = ARGV[1], ARGV[2]
local limit, per, block = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local lease, id, addr, marked = tonumber(ARGV[6]), ARGV[7], ARGV[8], ARGV[9] == '1'
local a = string.find(sides, 'a', 1, true) ~= nil
local s = string.find(sides, 's', 1, true) ~= nil
local ab, af, ap, sf, sx, sh, sa, si
local ki = 1
if a then
  ab, af, ap = KEYS[1], KEYS[2], KEYS[3]
  ki = 4
end
if s then
  sf, sx, sh, sa, si = KEYS[ki], KEYS[ki + 1], KEYS[ki + 2], KEYS[ki + 3], KEYS[ki + 4]
end

if op == 'check' or op == 'try' then
  local ms = 0
  if a then
    local left = redis.call('PTTL', ab)
    if left > ms then ms = left end
  end
  if s then
    local till = tonumber(redis.call('ZSCORE', sa, addr))
    if till and till - now > ms then ms = till - now end
  end
  if ms > 0 then return {1, ms, 0} end
  if op == 'check' then return {0, 0, 0} end
  if a then
    redis.call('ZREMRANGEBYSCORE', af, '-inf', now - per)
    redis.call('ZREMRANGEBYSCORE', ap, '-inf', now - lease)
    if redis.call('ZCARD', af) + redis.call('ZCARD', ap) >= limit then return {2, 1000, 0} end
  end
  local hot = s and redis.call('EXISTS', sh) == 1
  if hot then
    local till = tonumber(redis.call('ZSCORE', si, addr))
    if till and till > now then return {2, 1000, 0} end
  end
  if a then
    redis.call('ZADD', ap, now, id)
    redis.call('PEXPIRE', ap, lease)
  end
  if hot then
    redis.call('ZADD', si, now + lease, addr)
    redis.call('PEXPIRE', si, lease)
    return {0, 0, 1}
  end
  return {0, 0, 0}
end

if op == 'done' then
  if a then redis.call('ZREM', ap, id) end
  if s and marked then redis.call('ZREM', si, addr) end
  return {0, 0, 0}
end

-- 'fail': count the failure on each side; block what reached the limit
local blocked = 0
if a then
  redis.call('ZREM', ap, id)
  redis.call('ZREMRANGEBYSCORE', af, '-inf', now - per)
  redis.call('ZADD', af, now, id)
  redis.call('PEXPIRE', af, per)
  if redis.call('ZCARD', af) >= limit then
    redis.call('SET', ab, '1', 'PX', block)
    redis.call('DEL', af)
    blocked = 1
  end
end
if s then
  if marked then redis.call('ZREM', si, addr) end
  redis.call('ZREMRANGEBYSCORE', sa, '-inf', now)
  if redis.call('EXISTS', sh) == 1 then
    -- hot: this address is blocked for the subject at once, and the subject stays hot
    redis.call('PEXPIRE', sh, block)
    redis.call('ZADD', sa, now + block, addr)
    redis.call('PEXPIRE', sa, block)
    blocked = 1
  else
    redis.call('ZREMRANGEBYSCORE', sf, '-inf', now - per)
    redis.call('ZREMRANGEBYSCORE', sx, '-inf', now - per)
    redis.call('ZADD', sf, now, id)
    redis.call('ZADD', sx, now, addr)
    redis.call('PEXPIRE', sf, per)
    redis.call('PEXPIRE', sx, per)
    if redis.call('ZCARD', sf) >= limit then
      -- the subject is hot: every address that failed for it in the window is blocked
      redis.call('SET', sh, '1', 'PX', block)
      for _, who in ipairs(redis.call('ZRANGE', sx, 0, -1)) do
        redis.call('ZADD', sa, now + block, who)
      end
      redis.call('PEXPIRE', sa, block)
      redis.call('DEL', sf, sx)
      blocked = 1
    end
  end
end
return {blocked, block, 0}
