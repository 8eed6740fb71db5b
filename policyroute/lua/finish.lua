-- After the response: release slots, refund credits, store or drop records, in one trip.
local ki, ai = 1, 1
local function key() local v = KEYS[ki]; ki = ki + 1; return v end
local function arg() local v = ARGV[ai]; ai = ai + 1; return v end
local op = arg()
while op do
  if op == 'rel' then
    redis.call('ZREM', key(), arg())
  elseif op == 'ref' then
    local k, held = key(), key()
    local from_a, from_b, p, token = tonumber(arg()), tonumber(arg()), arg(), arg()
    -- Only a reservation still held goes back: one already swept was refunded then.
    if redis.call('ZREM', held, from_a .. ':' .. from_b .. ':' .. p .. ':' .. token) == 1 then
      if from_b > 0 then redis.call('HINCRBY', k, 'b', from_b) end
      -- allowance goes back only within the period it came from (a new period reset it)
      if from_a > 0 and redis.call('HGET', k, 'p') == p then
        redis.call('HINCRBY', k, 'a', from_a)
      end
    end
  elseif op == 'com' then
    redis.call('ZREM', key(), arg())
  elseif op == 'ids' then
    local k = key()
    local code, hd, bd, ttl = arg(), arg(), arg(), arg()
    redis.call('HSET', k, 'st', '1', 'code', code, 'hd', hd, 'bd', bd)
    redis.call('PEXPIRE', k, ttl)
  elseif op == 'idd' then
    local k = key()
    if redis.call('HGET', k, 'st') == '0' then redis.call('DEL', k) end
  elseif op == 'cas' then
    local v, lk = key(), key()
    local code, hd, bd, ttl, token = arg(), arg(), arg(), arg(), arg()
    -- a record always has these three fields: HSET replaces one a lapsed lock let in
    redis.call('HSET', v, 'code', code, 'hd', hd, 'bd', bd)
    redis.call('PEXPIRE', v, ttl)
    if redis.call('GET', lk) == token then redis.call('DEL', lk) end
  elseif op == 'utb' then
    -- give back tokens a refused request took on a cluster (limits are all-or-nothing)
    local k = key()
    local cap, cost = tonumber(arg()), tonumber(arg())
    local t = tonumber(redis.call('HGET', k, 't'))
    if t then redis.call('HSET', k, 't', tostring(math.min(cap, t + cost))) end
  elseif op == 'usw' then
    redis.call('ZPOPMAX', key(), tonumber(arg()))
  elseif op == 'cau' then
    local lk = key()
    if redis.call('GET', lk) == arg() then redis.call('DEL', lk) end
  end
  op = arg()
end
return 1
