-- The state call of a request whose only op is one token bucket (the commonest: a route
-- with one rate limit and nothing else stateful), with state.lua's reply and effects for
-- it and less work: no op loop, no table per limit or write. KEYS[1]: the bucket;
-- ARGV: 'tb', capacity, refill, per (ms), cost.
-- include: _bucket
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local k = KEYS[1]
local ok, left, reset, retry, cur, rest = bucket(
  k, tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), now)
if not ok then
  -- nothing taken: the row reports what the bucket has now
  return string.format('rate|0,%d,%d,%d,%d,0|', cur, reset, retry, cur)
end
redis.call('SET', k, rest .. ' ' .. now, 'PX', math.max(reset, 1))
return string.format('go|1,%d,%d,%d,%d,0|', left, reset, retry, cur)
