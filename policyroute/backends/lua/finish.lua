-- After the response: release slots, refund credits, store or drop records, in one trip.
-- Keys and arguments are read in place (no helper closures made anew on every call).
-- Calls of several requests may be joined into one; when one request's op fails, each
-- request's ops are sent again alone, so every op here must be safe to run twice.
local ki, ai = 1, 2
local op = ARGV[1]
while op do
  if op == 'rel' then
    redis.call('ZREM', KEYS[ki], ARGV[ai])
    ki, ai = ki + 1, ai + 1
  elseif op == 'ref' then
    local k, held, swept = KEYS[ki], KEYS[ki + 1], KEYS[ki + 2]
    local from_a, from_b = tonumber(ARGV[ai]), tonumber(ARGV[ai + 1])
    local p, token = ARGV[ai + 2], ARGV[ai + 3]
    ki, ai = ki + 3, ai + 4
    local m = from_a .. ':' .. from_b .. ':' .. p .. ':' .. token
    -- Only a reservation still held goes back: one already swept was refunded then.
    if redis.call('ZREM', held, m) == 1 then
      if from_b > 0 then redis.call('HINCRBY', k, 'b', from_b) end
      -- allowance goes back only within the period it came from (a new period reset it)
      if from_a > 0 and redis.call('HGET', k, 'p') == p then
        redis.call('HINCRBY', k, 'a', from_a)
      end
    else
      redis.call('ZREM', swept, m)
    end
  elseif op == 'com' then
    local k, held, swept, m = KEYS[ki], KEYS[ki + 1], KEYS[ki + 2], ARGV[ai]
    ki, ai = ki + 3, ai + 1
    -- A reservation swept while its request still ran (the hold ran out: the process
    -- stalled, or could not renew it) was refunded by that sweep: charge it again. Its
    -- mark goes with the charge, so a second run finds neither and charges nothing.
    if redis.call('ZREM', held, m) == 0 and redis.call('ZREM', swept, m) == 1 then
      local from_a, from_b, p = string.match(m, '^(%d+):(%d+):([^:]*):')
      local debt = tonumber(from_b)
      from_a = tonumber(from_a)
      -- the sweep gave allowance back only within its period: take it from there, and
      -- what that period has no more of from the balance (which may go below zero)
      if from_a > 0 and redis.call('HGET', k, 'p') == p then
        local a = tonumber(redis.call('HGET', k, 'a')) or 0
        local take = math.max(0, math.min(a, from_a))
        if take > 0 then redis.call('HINCRBY', k, 'a', -take) end
        debt = debt + from_a - take
      end
      if debt > 0 then redis.call('HINCRBY', k, 'b', -debt) end
    end
  elseif op == 'ids' then
    local k = KEYS[ki]
    redis.call('HSET', k, 'st', '1', 'code', ARGV[ai], 'hd', ARGV[ai + 1], 'bd', ARGV[ai + 2])
    redis.call('PEXPIRE', k, ARGV[ai + 3])
    ki, ai = ki + 1, ai + 4
  elseif op == 'idd' then
    local k = KEYS[ki]
    ki = ki + 1
    if redis.call('HGET', k, 'st') == '0' then redis.call('DEL', k) end
  elseif op == 'cas' then
    -- the response replaces the lock (or an entry a lapsed lock let another request store)
    redis.call('SET', KEYS[ki], ARGV[ai], 'PX', ARGV[ai + 1])
    ki, ai = ki + 1, ai + 2
  elseif op == 'utb' then
    -- give back tokens a refused request took on a cluster (limits are all-or-nothing)
    local k = KEYS[ki]
    local cap, cost = tonumber(ARGV[ai]), tonumber(ARGV[ai + 1])
    ki, ai = ki + 1, ai + 2
    local v = redis.call('GET', k)
    if v then
      local sp = string.find(v, ' ', 1, true)
      local t = tonumber(string.sub(v, 1, sp - 1))
      redis.call('SET', k, tostring(math.min(cap, t + cost)) .. string.sub(v, sp), 'KEEPTTL')
    end
  elseif op == 'uth' then
    -- give back a throttle's place a refused request took on a cluster
    local k, back = KEYS[ki], tonumber(ARGV[ai])
    ki, ai = ki + 1, ai + 1
    local tat = tonumber(redis.call('HGET', k, 'tat'))
    if tat then redis.call('HSET', k, 'tat', tostring(tat - back)) end
  elseif op == 'dbs' then
    -- a debounce's first request stores its response for the repeats that join it
    local k = KEYS[ki]
    if redis.call('HGET', k, 'tok') == ARGV[ai] then
      redis.call('HSET', k, 'st', '1', 'code', ARGV[ai + 1], 'hd', ARGV[ai + 2], 'bd', ARGV[ai + 3])
      redis.call('PEXPIRE', k, ARGV[ai + 4])
    end
    ki, ai = ki + 1, ai + 5
  elseif op == 'dbd' then
    -- ... or, with no response to share, ends the window (the repeats waiting retry)
    local k = KEYS[ki]
    local s = redis.call('HMGET', k, 'st', 'tok')
    if s[1] == '0' and s[2] == ARGV[ai] then redis.call('DEL', k) end
    ki, ai = ki + 1, ai + 1
  elseif op == 'usw' then
    redis.call('ZPOPMAX', KEYS[ki], tonumber(ARGV[ai]))
    ki, ai = ki + 1, ai + 1
  elseif op == 'cau' then
    -- no response to keep: the lock goes, if it is still this request's
    local v = KEYS[ki]
    if redis.call('GET', v) == 'L' .. ARGV[ai] then redis.call('DEL', v) end
    ki, ai = ki + 1, ai + 1
  end
  op = ARGV[ai]
  ai = ai + 1
end
return 1
