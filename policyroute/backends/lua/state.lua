-- One request's stateful pre-checks in one round trip (policyroute/steps/state.py).
-- ARGV[1] is Valkey's time in ms as the worker reads it (backends/clock.py), or '' to ask
-- the server; then the ops, each an opcode and its arguments; KEYS follow the same order.
-- Order: rate limits (all or nothing), credits (checked now, taken last), idempotency,
-- cache. A debounce that joins another request's response answers right after the
-- limits ('joined'): it takes no credits, opens no record and takes no lock. The first refusal returns at once, so later ops consume nothing (a short balance
-- waits until idempotency and cache could answer without the handler); credits are
-- taken only when the handler will run (never for a replay or a cache hit).
-- The reply is flat (a Lua table made into nested replies costs the server more than the
-- script's own commands): a head 'verdict|row;row|credit', each limit row
-- 'ok,left,reset,retry,cur,wait' and the credit 'from_a,from_b,balance,period'; an answer
-- (a replay, a cache hit, a joined response) follows the head as more bulk strings.
-- include: _period
-- include: _account
-- include: _bucket
local function head(verdict, rows, credit)
  if type(rows) == 'string' then return verdict .. '|' .. rows .. '|' .. credit end
  local parts = {}
  for i, r in ipairs(rows) do
    parts[i] = string.format('%d,%d,%d,%d,%d,%d', r[1], r[2], r[3], r[4], r[5], r[6] or 0)
  end
  return verdict .. '|' .. table.concat(parts, ';') .. '|' .. credit
end
local now = tonumber(ARGV[1])
local t = nil
if not now then
  t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
if ARGV[2] == 'tb' and ARGV[7] == nil then
  -- One token bucket and nothing else (a route with one rate limit and nothing more
  -- stateful), the commonest call: the same reply and effects as below, without the op
  -- loop and its tables.
  local k = KEYS[1]
  local ok, left, reset, retry, cur, rest, ttl = bucket(
    k, tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), now)
  if not ok then -- nothing taken: the row reports what the bucket has now
    return string.format('rate|0,%d,%d,%d,%d,0|', cur, reset, retry, cur)
  end
  redis.call('SET', k, rest, 'PX', ttl)
  return string.format('go|1,%d,%d,%d,%d,0|', left, reset, retry, cur)
end
-- One request's ops: its keys from KEYS[ki], its arguments ARGV[ai] to ARGV[last].
-- (Keys and arguments are read in place: no helper closures are made per op.)
local function one(ki, ai, last)
  local op = ARGV[ai]
  local limits
  local after = ARGV[ai + 5]
  if op == 'tb' and (ai + 4 == last or (after ~= 'tb' and after ~= 'sw' and after ~= 'cc'
      and after ~= 'th' and after ~= 'db')) then
    -- One token bucket, then no other limit (a route with one rate limit), the commonest
    -- call: the same replies and effects as the general loop below, without its tables.
    local k = KEYS[ki]
    local ok, left, reset, retry, cur, rest, ttl = bucket(
      k, tonumber(ARGV[ai + 1]), tonumber(ARGV[ai + 2]), tonumber(ARGV[ai + 3]),
      tonumber(ARGV[ai + 4]), now)
    if not ok then -- nothing taken: the row reports what the bucket has now
      return string.format('rate|0,%d,%d,%d,%d,0|', cur, reset, retry, cur)
    end
    redis.call('SET', k, rest, 'PX', ttl)
    limits = string.format('1,%d,%d,%d,%d,0', left, reset, retry, cur)
    if ai + 4 == last then return 'go|' .. limits .. '|' end
    ki, ai = ki + 1, ai + 6
    op = after
  else
    ai = ai + 1
    limits = {}
    local writes = {}
    local denied = false
    -- debounce windows a refused repeat restarts (written even when refused), and the
    -- response a joining repeat gets (made only by a debounce)
    local touches = nil
    local joined = nil
    while op == 'tb' or op == 'sw' or op == 'cc' or op == 'th' or op == 'db' do
      local k = KEYS[ki]
      ki = ki + 1
      -- ok, left now, reset, retry after (ms), left before, and a throttle's wait (ms); then
      -- how to take (written only when every limit allows: limits are all or nothing)
      local ok, left, reset, retry, cur, write, wait
      if op == 'tb' then
        local cap, refill, per = tonumber(ARGV[ai]), tonumber(ARGV[ai + 1]), tonumber(ARGV[ai + 2])
        local cost = tonumber(ARGV[ai + 3])
        ai = ai + 4
        local rest, ttl
        ok, left, reset, retry, cur, rest, ttl = bucket(k, cap, refill, per, cost, now)
        write = {op, k, rest, ttl}
      elseif op == 'sw' then
        local cap, per, cost = tonumber(ARGV[ai]), tonumber(ARGV[ai + 1]), tonumber(ARGV[ai + 2])
        ai = ai + 3
        redis.call('ZREMRANGEBYSCORE', k, '-inf', now - per)
        local n = redis.call('ZCARD', k)
        ok = n + cost <= cap
        retry = 0
        if not ok then
          local i = n + cost - cap - 1
          local e = redis.call('ZRANGE', k, i, i, 'WITHSCORES')
          retry = tonumber(e[2]) + per - now
        end
        local used = n
        if ok then used = n + cost end
        local oldest = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
        reset = per
        if oldest[2] then reset = tonumber(oldest[2]) + per - now end
        left, cur = cap - used, cap - n
        write = {op, k, n, cost, per}
      elseif op == 'cc' then
        -- a concurrency slot, held by the request's token until released or leased out
        local cap, lease, token = tonumber(ARGV[ai]), tonumber(ARGV[ai + 1]), ARGV[ai + 2]
        ai = ai + 3
        redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
        local n = redis.call('ZCARD', k)
        ok = n < cap
        left = cap - n
        if ok then left = left - 1 end
        reset, retry, cur = 0, 1000, cap - n
        write = {op, k, token, lease}
      elseif op == 'th' then
        -- a throttle: requests leave one `interval` apart (GCRA); `tat` is when the next one
        -- may leave. A request waits its turn unless more than `burst` are ahead of it, or it
        -- would wait longer than `maxwait` (-1: no bound but the queue's); the first `delay`
        -- of the queue go at once.
        local interval, burst, delay = tonumber(ARGV[ai]), tonumber(ARGV[ai + 1]), tonumber(ARGV[ai + 2])
        local maxwait, cost = tonumber(ARGV[ai + 3]), tonumber(ARGV[ai + 4])
        ai = ai + 5
        local tat = tonumber(redis.call('HGET', k, 'tat')) or now
        if tat < now then tat = now end
        local new = tat + cost * interval
        local room = (burst + cost) * interval
        wait = math.max(0, tat - now - delay * interval)
        ok = new - now <= room + 0.001
        retry = 0
        if not ok then retry = new - now - room end
        if maxwait >= 0 and wait > maxwait then
          ok = false
          retry = math.max(retry, wait - maxwait)
        end
        retry = math.ceil(retry)
        cur = math.max(0, math.floor((room - (tat - now)) / interval + 1e-9) - cost + 1)
        left = cur
        reset = math.ceil(tat - now)
        if ok then
          left = math.max(0, math.floor((room - (new - now)) / interval + 1e-9))
          reset = math.ceil(new - now)
        else
          wait = 0
        end
        write = {op, k, tostring(new), math.max(1, math.ceil(new - now))}
      else -- 'db': a debounce, one record per key and request; every repeat restarts the window
        local per, join, lease, token = tonumber(ARGV[ai]), ARGV[ai + 1] == '1', tonumber(ARGV[ai + 2]), ARGV[ai + 3]
        ai = ai + 4
        local s = redis.call('HMGET', k, 'st', 'tok', 'code', 'hd', 'bd')
        retry, reset = 0, per
        if not s[1] then
          -- the first of a burst: it runs (a joining window lasts while it is in flight)
          ok, left, cur = true, 0, 1
          local ttl = per
          if join and lease > ttl then ttl = lease end
          write = {op, k, token, ttl}
        elseif not join then
          ok, left, cur, retry = false, 0, 0, per
          touches = touches or {}
          touches[#touches + 1] = k
          touches[#touches + 1] = per
        else
          -- a repeat joins the first one: its response now, or once it is stored
          ok, left, cur = true, 0, 0
          write = {'dbj', k, per}
          joined = {s[1], s[2], s[3] or '', s[4] or '', s[5] or ''}
        end
      end
      limits[#limits + 1] = {ok and 1 or 0, left, reset, retry, cur, wait}
      writes[#writes + 1] = write
      if not ok then denied = true end
      op = ARGV[ai]
      ai = ai + 1
    end
    if denied then
      -- nothing was taken: report what each limit has now
      for _, row in ipairs(limits) do row[2] = row[5] end
      if touches then
        for i = 1, #touches, 2 do redis.call('PEXPIRE', touches[i], touches[i + 1]) end
      end
      return head('rate', limits, '')
    end
    for _, w in ipairs(writes) do
      local kind, k = w[1], w[2]
      if kind == 'tb' then
        redis.call('SET', k, w[3], 'PX', w[4])
      elseif kind == 'sw' then
        -- members unique to the microsecond the server wrote them (plus the count)
        t = t or redis.call('TIME')
        local now_us = t[1] .. string.format('%06d', tonumber(t[2]))
        local n = w[3]
        for i = 1, w[4] do redis.call('ZADD', k, now, now_us .. ':' .. (n + i)) end
        redis.call('PEXPIRE', k, w[5])
      elseif kind == 'cc' then
        redis.call('ZADD', k, now + w[4], w[3])
        redis.call('PEXPIRE', k, w[4])
      elseif kind == 'th' then
        redis.call('HSET', k, 'tat', w[3])
        redis.call('PEXPIRE', k, w[4])
      elseif kind == 'db' then
        redis.call('HSET', k, 'st', '0', 'tok', w[3])
        redis.call('PEXPIRE', k, w[4])
      else -- 'dbj': a joining repeat restarts the window (never shortening an in-flight one)
        if redis.call('PTTL', k) < w[3] then redis.call('PEXPIRE', k, w[3]) end
      end
    end
    if joined then
      return {head('joined', limits, ''), joined[1], joined[2], joined[3], joined[4], joined[5]}
    end
  end

  local credit = ''
  -- A short balance is answered only after idempotency and cache had their say: a replay
  -- or a cache hit costs nothing, so it must not be refused for want of credits.
  local short = nil
  -- the reservation, taken last (when the handler will run): account and hold keys, the
  -- account's new fields and the hold's expiry and member
  local take = nil
  if op == 'cr' then
    local k, held, swept = KEYS[ki], KEYS[ki + 1], KEYS[ki + 2]
    ki = ki + 3
    local cost, amount, every = tonumber(ARGV[ai]), tonumber(ARGV[ai + 1]), ARGV[ai + 2]
    local hold, token = tonumber(ARGV[ai + 3]), ARGV[ai + 4]
    ai = ai + 5
    local b, a, p, lost, due, exists = account(k, held, now)
    local kept = due ~= nil and p -- the bound and period as stored (unless searched)
    if not due then
      -- the holds were searched: sweep what expired, then bound the ones left
      if #lost > 0 then redis.call('ZREM', held, unpack(lost)) end
      local first = redis.call('ZRANGE', held, 0, 0, 'WITHSCORES')
      due = tonumber(first[2]) or NONE_HELD
      if #lost > 0 then
        redis.call('HSET', k, 'b', b, 'a', a, 'p', p, 'n', due)
        -- Remember what was swept for a day: a request that was still running commits it
        -- later, and its commit then charges it again (finish.lua, 'com').
        redis.call('ZREMRANGEBYSCORE', swept, '-inf', now)
        for _, m in ipairs(lost) do redis.call('ZADD', swept, now + SWEPT_KEPT, m) end
        redis.call('PEXPIRE', swept, SWEPT_KEPT)
      elseif exists then
        redis.call('HSET', k, 'n', due)
      end
    end
    if amount > 0 then
      local cur = period(now, every)
      if p ~= cur then a = amount; p = cur end
    end
    if b + a < cost then
      short = head('credits', limits, string.format('0,0,%d,', b + a) .. p)
    else
      local from_a = math.min(a, cost)
      local from_b = cost - from_a
      credit = string.format('%d,%d,%d,%s', from_a, from_b, b + a - cost, p)
      take = {k, b - from_b, a - from_a, p, held, now + hold,
        string.format('%d:%d:%s:%s', from_a, from_b, p, token), due,
        -- only the balance changes: nothing from the allowance, the same period, and a
        -- stored bound no later than this hold's expiry
        from_a == 0 and kept == p and now + hold >= due}
    end
    op = ARGV[ai]
    ai = ai + 1
  end

  local verdict = 'go'
  if op == 'id' then
    local k = KEYS[ki]
    ki = ki + 1
    local fp, lock = ARGV[ai], ARGV[ai + 1]
    ai = ai + 2
    local s = redis.call('HMGET', k, 'fp', 'st', 'code', 'hd', 'bd')
    if not s[1] then
      if short then return short end
      redis.call('HSET', k, 'fp', fp, 'st', '0')
      redis.call('PEXPIRE', k, lock)
    elseif s[1] ~= fp then
      return head('reused', limits, '')
    elseif s[2] == '0' then
      return head('inflight', limits, '')
    else
      return {head('replay', limits, ''), s[3], s[4], s[5]}
    end
    op = ARGV[ai]
    ai = ai + 1
  end

  if op == 'ca' then
    -- one key holds the stored response ('E...') or the lock of the request computing it
    -- ('L<token>'): a lookup that misses takes the lock in the same command
    local v = KEYS[ki]
    ki = ki + 1
    local lock, token = ARGV[ai], ARGV[ai + 1]
    ai = ai + 2
    local found = redis.call('SET', v, 'L' .. token, 'NX', 'GET', 'PX', lock)
    if found and string.byte(found, 1) == 69 then -- 'E'
      -- an idempotency record opened above is completed by finish.lua with this answer
      return {head('hit', limits, ''), found}
    end
    if short then
      if not found then redis.call('DEL', v) end -- the lock just taken: no handler will run
      return short
    end
    if found then verdict = 'wait' end
    op = ARGV[ai]
    ai = ai + 1
  end

  if short then return short end
  if take then
    -- the bound on the holds: this one's expiry when it is the first to expire
    if take[9] then
      redis.call('HSET', take[1], 'b', take[2])
    else
      redis.call('HSET', take[1], 'b', take[2], 'a', take[3], 'p', take[4], 'n',
        math.min(take[8], take[6]))
    end
    -- An empty set is removed by the server, so settled accounts keep no extra key.
    redis.call('ZADD', take[5], take[6], take[7])
  end
  return head(verdict, limits, credit)
end
if ARGV[2] ~= '*' then return one(1, 2, #ARGV) end
-- Several requests' calls joined in one (`Pipeline.share`): ARGV[2] is '*', then each
-- request's section: its number of keys, its number of arguments, its arguments (a
-- section's head is a number, never an op, so a request's ops end where its section
-- does). The reply is one per request, in order: an error in one request's ops is that
-- request's reply, and the others' stand.
local replies = {}
local ki, ai, n = 1, 3, #ARGV
while ai <= n do
  local nk, na = tonumber(ARGV[ai]), tonumber(ARGV[ai + 1])
  local ok, reply = pcall(one, ki, ai + 2, ai + 1 + na)
  if not ok and type(reply) ~= 'table' then reply = redis.error_reply(tostring(reply)) end
  replies[#replies + 1] = reply
  ki, ai = ki + nk, ai + 2 + na
end
return replies
