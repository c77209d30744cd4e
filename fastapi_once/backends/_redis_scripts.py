"""The Lua scripts of RedisBackend: each step on a record, atomic on the server.

A record's keys share one hash tag (``<namespace>:k:{<name>:<key>}:``): ``v`` holds the value as
``"<made ms> <json>"``, ``lock`` the lease as ``"<token> <holder>"``, ``cool`` a failure's
cooldown, ``fence`` the last fencing token; the leader's end is published on ``ev``.
"""

# KEYS: v, lock, cool, fence, 0.2's marker. ARGV: lock value, lease (ms), refresh age (ms, or '').
# {1, record} to serve; {3, ms left} while a failure cools down; {2, fence} when the lease is now
# ours; {0, lock value} while another holds it. The fence is the record's counter plus one,
# floored at the server's clock in microseconds: after a restart that lost the counter it still
# exceeds every token drawn before (the clock moved on). The counter outlives the lease by 60 s.
# An unkeyed record that 0.2 made (its marker: the JSON alone) is served as made at time 0.
CLAIM = """
local record = redis.call('GET', KEYS[1])
if not record and KEYS[5] ~= KEYS[1] then
  record = redis.call('GET', KEYS[5])
  if record then record = '0 ' .. record end
end
local now = redis.call('TIME')
if record then
  if ARGV[3] == '' or redis.call('EXISTS', KEYS[2], KEYS[3]) > 0 then return {1, record} end
  local made = tonumber(string.sub(record, 1, string.find(record, ' ') - 1))
  if now[1] * 1000 + math.floor(now[2] / 1000) - made < tonumber(ARGV[3]) then
    return {1, record}
  end
else
  local cool = redis.call('PTTL', KEYS[3])
  if cool > 0 then return {3, cool} end
end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {0, redis.call('GET', KEYS[2]) or ''}
end
local fence = redis.call('INCR', KEYS[4])
local floor = tonumber(now[1] .. string.format('%06d', tonumber(now[2])))
if fence < floor then
  fence = floor
  redis.call('SET', KEYS[4], string.format('%.0f', floor))
end
redis.call('PEXPIRE', KEYS[4], ARGV[2] + 60000)
return {2, fence}
"""

# KEYS: lock, fence. ARGV: lock value, lease (ms). Extends the lease only if it is still ours.
RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[2], ARGV[2] + 60000)
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""

# KEYS: lock, v, cool. ARGV: lock value, value, ttl (ms, or ''), channel.
# Records the value stamped with the server's time, frees the lease and wakes the watches, only
# if the lease is still ours.
COMPLETE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local now = redis.call('TIME')
local record = now[1] .. string.format('%03d', math.floor(now[2] / 1000)) .. ' ' .. ARGV[2]
if ARGV[3] == '' then
  redis.call('SET', KEYS[2], record)
else
  redis.call('SET', KEYS[2], record, 'PX', ARGV[3])
end
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('PUBLISH', ARGV[4], 'done')
return 1
"""

# KEYS: lock, cool. ARGV: lock value, cooldown (ms, or ''), channel.
# Records the cooldown, frees the lease and wakes the watches, only if the lease is still ours.
ABANDON = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], '1', 'PX', ARGV[2]) end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[3], 'failed')
return 1
"""
