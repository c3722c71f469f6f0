-- Shared by every script (prepended to each one). KEYS[1] is the record: the hash `runonce:{<key>}`.
-- Its change channel `runonce:{<key>}:changed` is derived from it, so a script names one key only and
-- runs in that key's hash slot.
local record_key = KEYS[1]
local channel = record_key .. ':changed'

-- Redis's clock in milliseconds. Every replica of runonce uses this one clock, so leases and ages do not
-- depend on how well the replicas' clocks agree.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A whole number as Redis wants it (Lua 5.1 would print large numbers in exponent form).
local function int(n)
  return string.format('%.0f', n)
end

-- Wakes the waiters of this key on every runonce replica (pub/sub; polling is their fallback).
local function changed(what)
  redis.call('PUBLISH', channel, what)
end

-- The same, only when a waiter counted itself in (`in_flight`): the usual call has no duplicate, and a message
-- nobody waits for would cost Redis and every replica's listener. Call it before deleting the record.
local function changed_if_waited(what)
  if redis.call('HEXISTS', record_key, 'waiters') == 1 then
    changed(what)
  end
end

-- The record as {'existing', state, owner, fp, fields, age_ms, status, head, body, delivered, cred, owed,
-- settled_ago_ms ('' while in flight)}, or false when there is none. An in-flight record whose lease ran out reads as 'unknown'; it is not changed
-- here. status/head/body are the answer of a 'done' record, or the answer that came with a 'released' or
-- 'unknown' outcome (empty when none came).
local function read_record(now)
  local r = redis.call('HMGET', record_key, 'state', 'owner', 'fp', 'fields', 'created', 'lease_until',
    'status', 'head', 'body', 'delivered', 'cred', 'owed', 'settled')
  if not r[1] then
    return false
  end
  local state = r[1]
  local settled = tonumber(r[13])
  if state == 'inflight' and (tonumber(r[6]) or 0) < now then
    state = 'unknown'
    settled = tonumber(r[6])
  end
  local settled_ago = ''
  if settled then
    settled_ago = int(math.max(now - settled, 0))
  end
  local age = now - (tonumber(r[5]) or now)
  if age < 0 then
    age = 0
  end
  return {'existing', state, r[2] or '', r[3] or '', r[4] or '', age, r[7] or '', r[8] or '', r[9] or '',
    r[10] or '0', r[11] or '', r[12] or '0', settled_ago}
end

-- Whether the record reads 'unknown' (a dead leader's in-flight one too) and was created by `owner`: the
-- record a resolver may change.
local function unknown_by(owner, now)
  local record = read_record(now)
  return record and record[2] == 'unknown' and record[3] == owner
end

-- Keeps the answer that came with a 'released' or 'unknown' outcome (ARGV from `first` on: status, head,
-- body; an empty status: none came), for the duplicates that waited.
local function keep_answer(first)
  if ARGV[first] ~= '' then
    redis.call('HSET', record_key, 'status', ARGV[first], 'head', ARGV[first + 1], 'body', ARGV[first + 2])
  end
end

-- Fencing: whether `token` leads the record and its lease still holds. Every change a leader makes
-- passes this check first; a leader whose lease ran out, or whose record was replaced, is refused.
local function leads(token, now)
  local r = redis.call('HMGET', record_key, 'state', 'owner', 'lease_until')
  return r[1] == 'inflight' and r[2] == token and (tonumber(r[3]) or 0) >= now
end

-- A new in-flight record led by `token`; `cred` is the digest of the leader's access token (never the token). It lives for lease + window: should its leader die, the record
-- still reads 'unknown' for a whole window after the lease ran out. Not published: nobody waits on a key
-- that had no record, or only a delivered answer (waiters wait on in-flight records).
local function create(token, fp, fields, lease, window, now, cred)
  redis.call('DEL', record_key)
  redis.call('HSET', record_key, 'state', 'inflight', 'owner', token, 'fp', fp, 'fields', fields,
    'created', int(now), 'lease_until', int(now + lease), 'window', int(window), 'delivered', '0',
    'cred', cred or '')
  redis.call('PEXPIRE', record_key, int(lease + window))
  return {'leader'}
end
