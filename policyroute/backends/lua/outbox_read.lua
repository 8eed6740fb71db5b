-- The next outbox entries for one relay, and the stream's length, in one trip.
-- KEYS[1] = stream. ARGV: group, consumer, count, claim_idle_ms (0 = do not claim).
-- Order: this consumer's own pending entries (publication blocked last time), then entries
-- other consumers left pending longer than claim_idle_ms (a crashed worker), then new ones.
local key, group, consumer, count = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local idle = tonumber(ARGV[4])

local function read(start)
  local args = {'XREADGROUP', 'GROUP', group, consumer, 'COUNT', count, 'STREAMS', key, start}
  local res = redis.pcall(unpack(args))
  if type(res) == 'table' and res.err then
    if not string.find(res.err, 'NOGROUP', 1, true) then
      return redis.error_reply(res.err)
    end
    -- First use, or the server lost the group: create it (and the stream) from the start.
    redis.call('XGROUP', 'CREATE', key, group, '0', 'MKSTREAM')
    res = redis.call(unpack(args))
  end
  if not res or not res[1] then return {} end
  return res[1][2]
end

local function live(entries)
  -- Entries deleted while pending come back without fields: acknowledge and skip them.
  local out = {}
  for _, entry in ipairs(entries) do
    if entry[2] then
      out[#out + 1] = entry
    else
      redis.call('XACK', key, group, entry[1])
    end
  end
  return out
end

local entries = read('0')
if entries.err then return entries end
entries = live(entries)
if #entries == 0 and idle > 0 then
  local claimed = redis.call('XAUTOCLAIM', key, group, consumer, idle, '0-0', 'COUNT', count)
  entries = live(claimed[2])
end
if #entries == 0 then
  entries = read('>')
  if entries.err then return entries end
end
return {redis.call('XLEN', key), entries}
