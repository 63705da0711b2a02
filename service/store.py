"""User state in Redis: comparisons (independent of the model) and fitted weights (per model version).

Keys, all of one user in one cluster hash slot thanks to the {braces}:
    <user> below is the id itself when plain ([A-Za-z0-9._:@-]{1,128}), else "~" + its urlsafe base64.
    {prefix}:u:{<user>}:c    list of comparisons, oldest first, capped by count and bytes (oldest dropped); each is
                             "=<size>:" + a slot per text (prompt, chosen, rejected): its 8-byte digest, or the
                             text itself if shorter than 32 bytes; <size> is the length of its JSON [prompt,
                             chosen, rejected] (what the byte cap counts); entries
                             written before texts were stored once are that JSON itself, read as before and rewritten
                             to digests the next time the user is read for a refit
    {prefix}:u:{<user>}:t    hash of the user's texts, each stored once: digest -> "<uses>:<UTF-8 text>" (or
                             "<uses>z<deflated text>" when that is smaller), uses being how many stored comparisons
                             refer to it (it goes when the last one is dropped)
    {prefix}:u:{<user>}:seq  how many comparisons were ever appended (monotonic; survives the caps)
    {prefix}:u:{<user>}:gen  the user's generation: a random token set by the first append after the user was
                             created or deleted; every fit records the one it was computed from
    {prefix}:u:{<user>}:bytes  total bytes of the stored comparisons' JSON (for the byte cap)
    {prefix}:u:{<user>}:w    hash model_version -> JSON StoredFit
    {prefix}:u:{<user>}:idem:<key>  an applied Idempotency-Key: "<body hash>:<seq after its append>", with a TTL
    {prefix}:u:{<user>}:idem         sorted set of the user's idempotency key names, scored by expiry
    {prefix}:u:{<user>}:gone  a checkpoint user was deleted: no model version seeds them again
    {prefix}:u:{<user>}:trash:<token>  a deleted user's comparisons (and <token>:t their texts), renamed away by the
                             delete and then freed by UNLINK (with a TTL, in case the deleting process dies first)
    {prefix}:u:{<user>}:refit a replica's lease on refitting the user for a new model version (expires)
    {prefix}:seeded          set of model versions whose checkpoint users were all written once
    {prefix}:seeding         hash model_version -> checkpoint users (sorted by id) written so far
    {prefix}:versions        sorted set model_version -> when it first ran (which versions' weights to keep)
    {prefix}:acked           written after each append when adapts WAIT for replicas (PAL_REDIS_MIN_REPLICAS)
    {prefix}:{sweep}:<version>  hash shard -> SCAN cursor ("done" when walked) of the background migration to a
                             model version, shared by all replicas; {prefix}:{sweep}:<version>:lease:<shard> is the
                             lease of the replica walking that shard (one shard per Cluster primary, else one)

Texts are stored once per user (by content digest), not once per comparison: RLHF comparisons repeat prompts and
pair each response with several others. The store stays per user (every key in the user's slot), so an append, a
cap and a DELETE stay one single-slot script, and a digest collision could only mix up texts of one user.

An append is one Lua script (texts + RPUSH + cap + INCRBY, and with an idempotency key: check it, then record it), so
concurrent adapts lose nothing and a key is applied at most once however many requests carry it. A fit records
the `seq` and the generation it was computed from and is written by a Lua script only if the user's generation is
still that one (no DELETE since the comparisons were read) and it is newer than the stored fit, so a slow refit
can neither overwrite a fresher one nor bring back anything of a deleted user. With a retention time
(`PAL_USER_TTL_S`) every append renews the expiry of all the user's keys, and a fit expires with the comparisons.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from service.errors import Invalid

# Checkpoint users written per round trip while seeding (and per progress record).
SEED_CHUNK = 1000
# Comparisons per LRANGE when reading a deleted user's trash: no reply is huge (at most ~3 MB of 20k-char texts).
READ_CHUNK = 50
# A deleted user's trash lives at most this long if the deleting process dies before freeing it.
TRASH_TTL_S = 3600
# On Redis Cluster, seed scripts in flight at once (redis-py pipelines no EVALSHA there): well under the
# client's 100 connections per node.
CLUSTER_SEED_CONCURRENCY = 32

# KEYS: weights, comparisons, generation; ARGV: model version, seq, fit JSON, the fit's generation.
# Written only if the user still has comparisons of the fit's generation (a DELETE since the read changes or removes
# it) and no fit of that generation with a seq as high is stored; the fit then expires with the comparisons.
_PUT_IF_NEWER = """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
if (redis.call('GET', KEYS[3]) or '') ~= ARGV[4] then return 0 end
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local ok, old = pcall(cjson.decode, cur)
  if ok and (old['gen'] or '') == ARGV[4] and old['seq'] and tonumber(old['seq']) >= tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
local ttl = redis.call('PTTL', KEYS[2])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""

_APPEND_ARGS = 7  # ARGV before the comparisons
COMPRESS_FROM = 200  # bytes from which a text is stored deflated if that is smaller
DIGEST_BYTES = 8  # of a text's blake2b digest: per user, so a collision could only mix up texts of one user
# Texts shorter than this stay in the entry: a digest and a hash entry would cost more than they save.
INLINE_BELOW = 32

# Shared by the scripts that add or drop comparisons. An entry is "=<size>:" and three slots, prompt, chosen,
# rejected: "#" + the digest of a text in the user's text hash (KEYS given as `txt`), or "'" + one byte of length +
# a short text itself. An entry written before is the comparison's JSON itself, whose size is its length.
_TEXTS_LUA = """
local function size(v)
  if string.byte(v, 1) ~= 61 then return #v end
  return tonumber(string.sub(v, 2, string.find(v, ':', 2, true) - 1))
end
-- A stored text is "<uses>" + its stored form (":" + the text, or "z" + it deflated): the count of uses rides in the
-- value, as a field of its own would cost a hash entry per text, as much as the text itself for short ones.
local function ref(txt, d, text)
  if d == '' then return end  -- a short text, inline in its entry
  local cur = redis.call('HGET', txt, d)
  if not cur then
    redis.call('HSET', txt, d, '1' .. text)
  else
    local sep = string.find(cur, '%D')
    redis.call('HSET', txt, d, (tonumber(string.sub(cur, 1, sep - 1)) + 1) .. string.sub(cur, sep))
  end
end
local function unref(txt, v)
  if string.byte(v, 1) ~= 61 then return end
  local pos = string.find(v, ':', 2, true) + 1
  while pos <= #v do
    if string.byte(v, pos) ~= 35 then
      pos = pos + 2 + string.byte(v, pos + 1)
    else
      local d = string.sub(v, pos + 1, pos + 8)
      pos = pos + 9
      local cur = redis.call('HGET', txt, d)
      if cur then
        local sep = string.find(cur, '%D')
        local uses = tonumber(string.sub(cur, 1, sep - 1)) - 1
        if uses <= 0 then redis.call('HDEL', txt, d) else redis.call('HSET', txt, d, uses .. string.sub(cur, sep)) end
      end
    end
  end
end
"""

# KEYS: comparisons, seq, generation, bytes, weights, texts[, idempotency key, the user's index of idempotency keys]
# ARGV: cap (count), cap (bytes), a new generation token, retention ms (0: none), body hash, key ttl seconds,
#       now (unix seconds), then per comparison: its entry, and digest and stored form of each of its three texts
#       (both empty for a text inline in the entry).
# Returns {1, seq, generation, stored} when appended, {0, seq of the first append, generation, stored} when the key
# was already applied with this body, {-1, 0, '', 0} when it was applied with another body. The oldest comparisons
# are dropped (and texts no kept comparison uses) while either cap is exceeded; the byte cap counts each
# comparison's JSON size, so it bounds what a refit encodes whatever the texts share. unpack() is chunked: Lua's
# stack holds ~8000 values.
_APPEND = _TEXTS_LUA + """
local keyed = #KEYS > 6
if keyed then
  local prev = redis.call('GET', KEYS[7])
  if prev then
    local sep = string.find(prev, ':', 1, true)
    if string.sub(prev, 1, sep - 1) ~= ARGV[5] then return {-1, 0, '', 0} end
    return {0, tonumber(string.sub(prev, sep + 1)), redis.call('GET', KEYS[3]) or '', redis.call('LLEN', KEYS[1])}
  end
end
local gen = redis.call('GET', KEYS[3])
if not gen then
  -- A user created (or created again after a DELETE). Comparisons stored before generations existed keep '' so
  -- that their fits stay valid.
  gen = ARGV[3]
  if redis.call('EXISTS', KEYS[1]) == 1 then gen = '' end
  redis.call('SET', KEYS[3], gen)
end
local bytes = tonumber(redis.call('GET', KEYS[4]) or '-1')
if bytes < 0 then  -- stored before sizes were counted: count them once
  bytes = 0
  local n = redis.call('LLEN', KEYS[1])
  for i = 0, n - 1, 500 do
    for _, v in ipairs(redis.call('LRANGE', KEYS[1], i, i + 499)) do bytes = bytes + size(v) end
  end
end
-- Texts are referenced before the oldest comparisons are dropped, so one shared with a dropped one stays.
local entries = {}
for i = 8, #ARGV, 7 do
  for k = i + 1, i + 5, 2 do ref(KEYS[6], ARGV[k], ARGV[k + 1]) end
  entries[#entries + 1] = ARGV[i]
  bytes = bytes + size(ARGV[i])
end
for i = 1, #entries, 1000 do
  redis.call('RPUSH', KEYS[1], unpack(entries, i, math.min(i + 999, #entries)))
end
local cap, max_bytes = tonumber(ARGV[1]), tonumber(ARGV[2])
local len = redis.call('LLEN', KEYS[1])
while len > 0 and (len > cap or bytes > max_bytes) do
  local v = redis.call('LPOP', KEYS[1])
  bytes = bytes - size(v)
  unref(KEYS[6], v)
  len = len - 1
end
redis.call('SET', KEYS[4], bytes)
local seq = redis.call('INCRBY', KEYS[2], #entries)
local retention = tonumber(ARGV[4])
if retention > 0 then
  for i = 1, 6 do redis.call('PEXPIRE', KEYS[i], retention) end
end
if keyed then
  local ttl, now = tonumber(ARGV[6]), tonumber(ARGV[7])
  redis.call('SET', KEYS[7], ARGV[5] .. ':' .. seq, 'EX', ttl)
  redis.call('ZADD', KEYS[8], now + ttl, KEYS[7])
  redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', now)
  redis.call('EXPIRE', KEYS[8], ttl)
end
return {1, seq, gen, len}
"""

# KEYS: comparisons, texts; ARGV per comparison stored in the old format: that JSON, its new entry, and digest and
# text of each of its three texts. Rewrites every such entry still in the list (found by value: appends and caps may
# have moved it since it was read) and returns how many; sizes are unchanged, so the byte count holds.
_COMPACT = _TEXTS_LUA + """
local new = {}
for i = 1, #ARGV, 8 do new[ARGV[i]] = i end
local n, done = redis.call('LLEN', KEYS[1]), 0
for s = 0, n - 1, 500 do
  for j, v in ipairs(redis.call('LRANGE', KEYS[1], s, s + 499)) do
    local i = new[v]
    if i then
      for k = i + 2, i + 6, 2 do ref(KEYS[2], ARGV[k], ARGV[k + 1]) end
      redis.call('LSET', KEYS[1], s + j - 1, ARGV[i + 1])
      done = done + 1
    end
  end
end
local ttl = redis.call('PTTL', KEYS[1])
if done > 0 and ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return done
"""

# KEYS: comparisons, seq, weights, the user's index of idempotency keys, generation, bytes, tombstone, trash, texts,
# the texts' trash;
# ARGV: '1' to leave the tombstone, seconds the trash may live, the deletions channel, the user id. The indexed
# keys are not in KEYS (they are only known here) but share the user's {hash tag}, so this also runs on Redis
# Cluster. O(1) in the size of the user's comparisons: they and their texts are renamed to the trash keys, which the
# caller reads in chunks and UNLINKs, so deleting a big user blocks no other client and the answer is never lost to
# a timeout. The deletion is published in the same atomic step, so every subscribed replica hears of it before anyone
# can see its effect. Returns {keys deleted, 1 if trashed}.
_DELETE_USER = """
local idem = redis.call('ZRANGE', KEYS[4], 0, -1)
for i = 1, #idem, 1000 do
  redis.call('DEL', unpack(idem, i, math.min(i + 999, #idem)))
end
local n = redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
local trashed = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('RENAME', KEYS[1], KEYS[8])
  redis.call('EXPIRE', KEYS[8], tonumber(ARGV[2]))
  trashed = 1
  if redis.call('EXISTS', KEYS[9]) == 1 then
    redis.call('RENAME', KEYS[9], KEYS[10])
    redis.call('EXPIRE', KEYS[10], tonumber(ARGV[2]))
  end
else
  n = n + redis.call('DEL', KEYS[9])
end
if ARGV[1] == '1' then redis.call('SET', KEYS[7], '1') end
if n + trashed > 0 then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return {n + trashed, trashed}
"""

# KEYS: weights, tombstone; ARGV: model version, fit. A user deleted (tombstone) is never seeded again.
_SEED_USER = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
return redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
"""


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


# KEYS: the user's refit lease; ARGV: the token that took it. Deletes the lease only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# KEYS: a migration's cursors, the lease on one of its shards; ARGV: the shard, its cursor, the lease holder's token,
# lease seconds. Saves the cursor (and renews the lease) only while the caller still holds the lease: one whose lease
# expired (it stalled, another replica took the shard over) must not move the new holder's cursor back.
_SAVE_CURSOR = """
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
return 1
"""

SWEPT = "done"  # a shard's cursor once the migration walked all of it


@dataclass(frozen=True)
class Shard:
    """A part of the keyspace that one SCAN walks: the whole server, or one Redis Cluster primary, named by the first
    hash slot it serves (a name that survives a failover to its replica)."""

    name: str
    node: Any = None  # the cluster node (None: the one server)


class NotReplicated(RedisError):
    """The write is on the primary, but fewer replicas than PAL_REDIS_MIN_REPLICAS confirmed it in time."""


class IdempotencyKeyReused(Invalid):
    """The Idempotency-Key was already applied to this user with other comparisons."""

    def __init__(self, key: str | None, user: str) -> None:
        super().__init__(
            f"Idempotency-Key {key!r} reused with a different body: it was already applied to user {user!r} with "
            "other comparisons"
        )


@dataclass(frozen=True)
class Appended:
    seq: int  # the user's append counter right after this request's comparisons (the first request's, on a replay)
    replayed: bool  # the idempotency key was already applied: nothing was appended
    gen: str  # the user's generation the comparisons belong to
    stored: int  # comparisons stored for the user now


@dataclass(frozen=True)
class Deleted:
    trash: str | None  # where the user's comparisons were moved, to be read and freed (None: they had none)


@dataclass(frozen=True)
class UserData:
    comparisons: list[Comparison]
    seq: int  # the append counter they correspond to
    gen: str  # the generation they belong to


@dataclass(frozen=True)
class Comparison:
    prompt: str
    chosen: str
    rejected: str

    def to_json(self) -> str:
        # ASCII escapes: a lone surrogate (valid in a JSON string, not in UTF-8) is stored and read back intact
        # instead of failing the Redis write.
        return json.dumps([self.prompt, self.chosen, self.rejected])

    @classmethod
    def from_json(cls, raw: bytes | str) -> Comparison:
        p, c, r = json.loads(raw)
        return cls(p, c, r)


@dataclass(frozen=True)
class StoredFit:
    weights: list[float]
    n_fitted: int  # comparisons the fit used
    seq: int  # the user's append counter when the comparisons were read (0 for checkpoint users)
    accuracy: float | None
    confidence: float | None
    source: str  # "adapt" | "checkpoint"
    fitted_at: float
    gen: str = ""  # the user's generation the comparisons were read from ("" for checkpoint users)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> StoredFit:
        return cls(**json.loads(raw))

    @classmethod
    def checkpoint(cls, weights: np.ndarray, now: float) -> StoredFit:
        """A checkpoint user's weights as written by seeding (no comparisons behind them)."""
        return cls([float(x) for x in weights], 0, 0, None, None, "checkpoint", now)

    @property
    def array(self) -> np.ndarray:
        return np.asarray(self.weights, dtype=np.float64)


# Ids of this charset are their own key part, as before any other id was allowed (existing keys stay valid).
_PLAIN_USER_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


def user_key_part(user: str) -> str:
    """The user's part of a key: the id itself if plain, else "~" + its urlsafe base64 (no padding). "~" is not
    in the plain charset, so the two forms never collide; base64 has no braces (the cluster hash tag), globs,
    spaces or control characters; and, unlike a hash, it decodes back to the id (for the migration's scan)."""
    if _PLAIN_USER_ID.fullmatch(user):
        return user
    return "~" + base64.urlsafe_b64encode(user.encode("utf-8", "surrogatepass")).decode().rstrip("=")


def user_from_key_part(part: str) -> str:
    if not part.startswith("~"):
        return part
    raw = part[1:]
    return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("utf-8", "surrogatepass")


class UserStore:
    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        prefix: str,
        max_comparisons: int,
        max_bytes: int = 8 * 2**20,
        retention_s: float | None = None,
        min_replicas: int = 0,
        wait_timeout_ms: int = 500,
    ) -> None:
        self.r = client
        self.prefix = prefix
        self.max_comparisons = max_comparisons
        self.max_bytes = max_bytes  # of a user's stored comparisons' JSON
        self.retention_s = retention_s  # forget a user this long after their last append (None: never)
        self.cluster = isinstance(client, RedisCluster)
        self.min_replicas = min_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._put_if_newer = client.register_script(_PUT_IF_NEWER)
        self._append = client.register_script(_APPEND)
        self._delete_user = client.register_script(_DELETE_USER)
        self._seed_user = client.register_script(_SEED_USER)
        self._release = client.register_script(_RELEASE)
        self._compact = client.register_script(_COMPACT)
        self._save_cursor = client.register_script(_SAVE_CURSOR)

    @property
    def deletions_channel(self) -> str:
        """Pub/sub channel on which every DELETE publishes the user id (so replicas drop their cached weights)."""
        return f"{self.prefix}:deleted"

    def _key(self, user: str, kind: str) -> str:
        return f"{self.prefix}:u:{{{user_key_part(user)}}}:{kind}"

    async def ping(self) -> bool:
        return bool(await self.r.ping())

    async def append_comparisons(
        self,
        user: str,
        comparisons: Iterable[Comparison],
        idempotency_key: str | None = None,
        key_ttl_s: int = 86400,
    ) -> Appended:
        """Append atomically, drop the oldest past the caps (count and bytes).

        With an idempotency key, checking and recording the key is part of the same atomic step: a key already
        applied to this user appends nothing (`replayed`), so retries and concurrent copies of one request store
        its comparisons once. Raises IdempotencyKeyReused if the key was applied with other comparisons.
        """
        comparisons = list(comparisons)
        values = [c.to_json() for c in comparisons]
        keys = [self._key(user, kind) for kind in ("c", "seq", "gen", "bytes", "w", "t")]
        body_hash = ""
        retention_ms = 0 if self.retention_s is None else max(1, int(self.retention_s * 1000))
        if idempotency_key is not None:
            keys += [self._key(user, f"idem:{idempotency_key}"), self._key(user, "idem")]
            # The JSON values hold no raw newline, so joining them is unambiguous.
            body_hash = hashlib.blake2b("\n".join(values).encode(), digest_size=16).hexdigest()
            if self.retention_s is not None:  # a key must not outlive the comparisons it stands for
                key_ttl_s = max(1, min(key_ttl_s, int(self.retention_s)))
        args = [
            self.max_comparisons, self.max_bytes, uuid.uuid4().hex, retention_ms, body_hash, key_ttl_s,
            f"{time.time():.3f}",
        ]  # fmt: skip
        for c, v in zip(comparisons, values, strict=True):
            args += _packed(c, len(v))
        status, seq, gen, stored = await self._append_replicated(keys, args)
        if int(status) < 0:
            raise IdempotencyKeyReused(idempotency_key, user)
        return Appended(seq=int(seq), replayed=int(status) == 0, gen=_text(gen), stored=int(stored))

    async def _append_replicated(self, keys: list[str], args: list) -> Any:
        """Run the append script; with min_replicas, also WAIT for that many replicas to hold it.

        WAIT counts the replicas holding this connection's writes, so it goes in one pipeline (one connection)
        with the script. A replayed key writes nothing, yet the first copy may not be on a replica: a SET of
        {prefix}:acked is a write on this connection after the first copy in the replication stream (not a user
        key, which a concurrent DELETE could see recreated; WAIT is refused on Cluster, so one key serves).
        Trade-off: one replication round trip more per adapt, and NotReplicated (a RedisError: /adapt answers
        503) when the replicas are slow or gone, although the primary has the write.
        """
        if not self.min_replicas:
            return await self._append(keys=keys, args=args)
        async with self.r.pipeline(transaction=False) as p:
            await self._append(keys=keys, args=args, client=p)
            p.set(f"{self.prefix}:acked", "1")
            p.execute_command("WAIT", self.min_replicas, self.wait_timeout_ms)
            result, _, acked = await p.execute()
        if int(acked) < self.min_replicas:
            raise NotReplicated(
                f"written on the primary but confirmed by {acked} of {self.min_replicas} replicas within "
                f"{self.wait_timeout_ms} ms (PAL_REDIS_MIN_REPLICAS)"
            )
        return result

    async def read_comparisons(self, user: str) -> tuple[list[Comparison], int]:
        """All stored comparisons and the append counter they correspond to, read in one transaction."""
        data = await self.read_user(user)
        return data.comparisons, data.seq

    async def read_user(self, user: str) -> UserData:
        """The stored comparisons with their append counter and generation, read in one transaction.

        Bounded by the per-user caps; the JSON is parsed in a worker thread so a big user does not stall the event
        loop."""
        async with self.r.pipeline(transaction=True) as p:
            p.lrange(self._key(user, "c"), 0, -1)
            p.hgetall(self._key(user, "t"))
            p.get(self._key(user, "seq"))
            p.get(self._key(user, "gen"))
            raw, texts, seq, gen = await p.execute()
        if len(raw) > 200:
            comparisons = await asyncio.to_thread(parse_comparisons, raw, texts)
        else:
            comparisons = parse_comparisons(raw, texts)
        old = [(v, c) for v, c in zip(raw, comparisons, strict=True) if not _is_entry(v)]
        if old:  # stored before texts were stored once: rewritten now, so the user shrinks on their first refit
            await self._compact_old(user, old)
        return UserData(comparisons, int(seq or 0), _text(gen or b""))

    async def _compact_old(self, user: str, old: list[tuple[bytes, Comparison]]) -> int:
        args: list[bytes | str] = []
        for raw, c in old:
            args += [raw, *_packed(c, len(raw))]
        return int(await self._compact(keys=[self._key(user, "c"), self._key(user, "t")], args=args))

    async def count_comparisons(self, user: str) -> tuple[int, int]:
        """(comparisons stored now, the user's append counter)."""
        n, seq, _ = await self.counts(user)
        return n, seq

    async def counts(self, user: str) -> tuple[int, int, str]:
        """(comparisons stored now, the user's append counter, the user's generation)."""
        async with self.r.pipeline(transaction=True) as p:
            p.llen(self._key(user, "c"))
            p.get(self._key(user, "seq"))
            p.get(self._key(user, "gen"))
            n, seq, gen = await p.execute()
        return int(n), int(seq or 0), _text(gen or b"")

    async def is_forgotten(self, user: str) -> bool:
        """A checkpoint user was deleted (see delete_user's tombstone)."""
        return bool(await self.r.exists(self._key(user, "gone")))

    async def get_fit(self, version: str, user: str) -> StoredFit | None:
        raw = await self.r.hget(self._key(user, "w"), version)
        return None if raw is None else StoredFit.from_json(raw)

    async def get_fits_checked(self, version: str, users: list[str]) -> tuple[dict[str, StoredFit], list[str]]:
        """Fits of many users in one round trip, and which users have comparisons that no fit of this version was
        computed from (no fit, or only the checkpoint's): a new model version that has not refitted them yet."""
        if not users:
            return {}, []
        async with self.r.pipeline(transaction=False) as p:
            for u in users:
                p.hget(self._key(u, "w"), version)
                p.exists(self._key(u, "c"))
            replies = await p.execute()
        fits = {u: StoredFit.from_json(raw) for u, raw in zip(users, replies[::2], strict=True) if raw is not None}
        unfitted = [
            u for u, has in zip(users, replies[1::2], strict=True)
            if int(has) and (u not in fits or fits[u].source != "adapt")
        ]  # fmt: skip
        return fits, unfitted

    async def put_fit_if_newer(self, version: str, user: str, fit: StoredFit) -> bool:
        """Store the fit unless the user was deleted since its comparisons were read (their generation is gone)
        or a fit of the same generation covering as many appends is stored already."""
        keys = [self._key(user, "w"), self._key(user, "c"), self._key(user, "gen")]
        return bool(await self._put_if_newer(keys=keys, args=[version, fit.seq, fit.to_json(), fit.gen]))

    async def seed_checkpoint_users(
        self, version: str, weights: dict[str, np.ndarray], chunk: int = SEED_CHUNK
    ) -> int:
        """Write the checkpoint's seen users once per model version (a later DELETE stays deleted).

        Resumable: the users go in id order, `chunk` per round trip, and the count written so far is recorded
        after each chunk, so seeding cut short (Redis lost, the process killed, start-up gave up waiting) goes on
        where it stopped, and the version counts as seeded only once every user is written. A chunk cut short is
        written again; HSETNX never overwrites a fit already stored for this version, and a checkpoint user
        deleted before (under any version) is skipped. Returns how many were written by this call.
        """
        seeded, progress = f"{self.prefix}:seeded", f"{self.prefix}:seeding"
        if await self.r.sismember(seeded, version):
            return 0
        items = sorted(weights.items())
        done = int(await self.r.hget(progress, version) or 0)
        now = time.time()
        written = 0
        for start in range(done, len(items), chunk):
            batch = [
                ([self._key(u, "w"), self._key(u, "gone")], [version, StoredFit.checkpoint(w, now).to_json()])
                for u, w in items[start : start + chunk]
            ]
            written += await (self._seed_cluster(batch) if self.cluster else self._seed_pipelined(batch))
            await self.r.hset(progress, version, start + len(batch))
        async with self.r.pipeline(transaction=False) as p:
            p.sadd(seeded, version)
            p.hdel(progress, version)
            await p.execute()
        return written

    async def _seed_pipelined(self, batch: list[tuple[list[str], list[str]]]) -> int:
        async with self.r.pipeline(transaction=False) as p:
            for keys, args in batch:
                await self._seed_user(keys=keys, args=args, client=p)
            return sum(int(x) for x in await p.execute())

    async def _seed_cluster(self, batch: list[tuple[list[str], list[str]]]) -> int:
        """redis-py refuses EVALSHA in a cluster pipeline (RedisClusterException), so the users' scripts go as
        single commands, a bounded number at once, each to the node that owns its user's slot."""
        gate = asyncio.Semaphore(CLUSTER_SEED_CONCURRENCY)

        async def one(keys: list[str], args: list[str]) -> int:
            async with gate:
                return int(await self._seed_user(keys=keys, args=args))

        return sum(await asyncio.gather(*(one(k, a) for k, a in batch)))

    async def claim_refit(self, user: str, token: str, lease_s: int) -> bool:
        """Take the lease on refitting `user` (False: another replica holds it). Replicas migrating at once split
        the refits this way instead of encoding and fitting the same users; a lease expires if its holder dies."""
        return bool(await self.r.set(self._key(user, "refit"), token, nx=True, ex=lease_s))

    async def release_refit(self, user: str, token: str) -> None:
        await self._release(keys=[self._key(user, "refit")], args=[token])

    async def record_version(self, version: str) -> None:
        """Remember when a model version first ran: pruning keeps the newest ones by this order."""
        await self.r.zadd(f"{self.prefix}:versions", {version: time.time()}, nx=True)

    async def prune_versions(self, keep: int, current: str, chunk: int = SEED_CHUNK) -> int:
        """Delete the weights of model versions older than the newest `keep` (never `current`) from every user.

        The pruned versions are first forgotten as seeded, so rolling back to one seeds its checkpoint users again
        (and users with comparisons are refitted, their fit being missing). Nothing happens, and nothing is
        scanned, unless some version is past `keep`; of replicas pruning at once, only the one that forgets the
        versions scans. Returns how many weight fields were deleted.
        """
        versions_key, seeded_key = f"{self.prefix}:versions", f"{self.prefix}:seeded"
        newest = [_text(v) for v in await self.r.zrevrange(versions_key, 0, keep - 1)]
        kept = {*newest, current}
        known = {_text(v) for v in await self.r.zrange(versions_key, 0, -1)}
        known |= {_text(v) for v in await self.r.smembers(seeded_key)}
        old = sorted(known - kept)
        if not old:
            return 0
        async with self.r.pipeline(transaction=False) as p:
            p.srem(seeded_key, *old)
            p.hdel(f"{self.prefix}:seeding", *old)
            p.zrem(versions_key, *old)
            for v in old:  # a rollback to one walks its users again
                p.delete(self._sweep_key(v))
            unseeded, _, unversioned, *_ = await p.execute()
        if not int(unseeded) and not int(unversioned):
            return 0  # another replica forgot them first and walks the weights: one walk per retired version
        # Every field not kept goes, including any a replica of an older version wrote meanwhile.
        deleted, keys = 0, []
        async for key in self.r.scan_iter(match=f"{self.prefix}:u:{{*}}:w", count=1000):
            keys.append(key)
            if len(keys) >= chunk:
                deleted += await self._drop_fields(keys, kept)
                keys = []
        if keys:
            deleted += await self._drop_fields(keys, kept)
        return deleted

    async def _drop_fields(self, keys: list, kept: set[str]) -> int:
        async with self.r.pipeline(transaction=False) as p:
            for k in keys:
                p.hkeys(k)
            fields = await p.execute()
        drops = [(k, [f for f in fs if _text(f) not in kept]) for k, fs in zip(keys, fields, strict=True)]
        drops = [(k, fs) for k, fs in drops if fs]
        if not drops:
            return 0
        async with self.r.pipeline(transaction=False) as p:
            for k, fs in drops:
                p.hdel(k, *fs)
            return sum(int(n) for n in await p.execute())

    async def delete_user(self, user: str, tombstone: bool = False) -> Deleted | None:
        """Forget comparisons, weights of every model version, generation and idempotency keys; None if nothing
        existed. The comparisons are moved to a trash key (`Deleted.trash`) in the same atomic step: the caller
        reads them with `drain_trash` (to drop what it derived from them) and so frees them without blocking Redis.

        One script, so an adapt cannot record a key between the reading of the key index and the deletion, and a
        refit in flight cannot store its fit afterwards (the generation it read is gone).
        `tombstone`: the user is in a checkpoint; leave a mark so that no model version (this one or a later one
        whose checkpoint still holds them) seeds their weights again. Only the id is kept, which the checkpoint
        holds anyway; other users leave nothing behind.
        """
        trash = self._key(user, f"trash:{uuid.uuid4().hex}")
        keys = [self._key(user, kind) for kind in ("c", "seq", "w", "idem", "gen", "bytes", "gone")]
        keys += [trash, self._key(user, "t"), f"{trash}:t"]
        args = ["1" if tombstone else "0", TRASH_TTL_S, self.deletions_channel, user]
        n, trashed = await self._delete_user(keys=keys, args=args)
        if int(n) == 0:
            return None
        return Deleted(trash if int(trashed) else None)

    async def drain_trash(self, trash: str, chunk: int = READ_CHUNK) -> AsyncIterator[list[Comparison]]:
        """A deleted user's comparisons, `chunk` at a time (each LRANGE is small), then the key is UNLINKed: freed
        by a background thread of Redis, not while other clients wait."""
        try:
            start = 0
            while raw := await self.r.lrange(trash, start, start + chunk - 1):
                refs = sorted({d for v in raw if _is_entry(v) for d in _digests(v)})
                texts = dict(zip(refs, await self.r.hmget(f"{trash}:t", refs), strict=True)) if refs else {}
                yield await asyncio.to_thread(parse_comparisons, raw, texts)
                start += chunk
        finally:
            await self.r.unlink(trash, f"{trash}:t")

    async def users_with_comparisons(self) -> AsyncIterator[str]:
        """Every user with stored comparisons (on Redis Cluster, redis-py's scan_iter walks every primary)."""
        async for key in self.r.scan_iter(match=self._comparisons_glob, count=1000):
            yield self._user_of(key)

    @property
    def _comparisons_glob(self) -> str:
        return f"{self.prefix}:u:{{*}}:c"

    def _user_of(self, comparisons_key: bytes | str) -> str:
        head, tail = f"{self.prefix}:u:{{", "}:c"
        return user_from_key_part(_text(comparisons_key)[len(head) : -len(tail)])

    # --- the background migration to a model version, shared by the replicas (service/startup.py)
    def _sweep_key(self, version: str) -> str:
        return f"{self.prefix}:{{sweep}}:{version}"  # one hash tag: the cursor script runs on Cluster

    def _sweep_lease(self, version: str, shard: str) -> str:
        return f"{self._sweep_key(version)}:lease:{shard}"

    async def shards(self) -> list[Shard]:
        """What SCAN walks: the server, or every primary of a Redis Cluster."""
        if not self.cluster:
            return [Shard("all")]
        await self.r.ping()  # the client learns the slots on its first command
        first: dict[str, int] = {}
        for slot, nodes in self.r.nodes_manager.slots_cache.items():
            if nodes:
                first[nodes[0].name] = min(first.get(nodes[0].name, slot), slot)
        return [Shard(str(slot), self.r.get_node(node_name=name)) for name, slot in sorted(first.items())]

    async def sweep_cursors(self, version: str) -> dict[str, str]:
        """Shard name -> where the migration to `version` stands in it (a SCAN cursor, or SWEPT)."""
        return {_text(k): _text(v) for k, v in (await self.r.hgetall(self._sweep_key(version))).items()}

    async def claim_shard(self, version: str, shard: str, token: str, lease_s: int) -> bool:
        return bool(await self.r.set(self._sweep_lease(version, shard), token, nx=True, ex=lease_s))

    async def save_cursor(self, version: str, shard: str, cursor: str, token: str, lease_s: int) -> bool:
        """Record progress and renew the lease; False if the lease is no longer the caller's."""
        keys = [self._sweep_key(version), self._sweep_lease(version, shard)]
        return bool(await self._save_cursor(keys=keys, args=[shard, cursor, token, lease_s]))

    async def release_shard(self, version: str, shard: str, token: str) -> None:
        await self._release(keys=[self._sweep_lease(version, shard)], args=[token])

    async def scan_users(self, shard: Shard, cursor: int, count: int) -> tuple[int, list[str]]:
        """One SCAN page of users with comparisons in `shard`: the next cursor (0: walked) and the users."""
        if shard.node is None:
            cursor, keys = await self.r.scan(cursor, match=self._comparisons_glob, count=count)
        else:
            cursors, keys = await self.r.scan(
                cursor=cursor, match=self._comparisons_glob, count=count, target_nodes=shard.node
            )
            cursor = next(iter(cursors.values()))
        return int(cursor), [self._user_of(k) for k in keys]

    async def iter_fit_weights(self, version: str, chunk: int = 1000) -> AsyncIterator[list[list[float]]]:
        """Every user's fitted weights for this model version, `chunk` users per round trip (for population
        objectives: streamed, so memory holds one chunk of Redis replies at a time; whose they are is not needed)."""
        keys: list[str] = []

        async def fetch(batch: list[str]) -> list[list[float]]:
            async with self.r.pipeline(transaction=False) as p:
                for key in batch:
                    p.hget(key, version)
                raws = await p.execute()
            return [StoredFit.from_json(raw).weights for raw in raws if raw is not None]

        async for key in self.r.scan_iter(match=f"{self.prefix}:u:{{*}}:w", count=chunk):
            keys.append(_text(key))
            if len(keys) >= chunk:
                yield await fetch(keys)
                keys = []
        if keys:
            yield await fetch(keys)


def _text(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate (valid JSON) is stored and read back intact


def _stored_form(text: bytes) -> bytes:
    """How a text is kept: deflated when that saves a tenth (prose of a few hundred characters deflates to about
    half; short texts do not shrink), else as is. Only this process reads it: the scripts move it unopened."""
    if len(text) >= COMPRESS_FROM:
        packed = zlib.compress(text, 6)
        if len(packed) < 0.9 * len(text):
            return b"z" + packed
    return b":" + text


def stored_text(value: bytes) -> str:
    """A text from its value in the user's text hash ("<uses>" + its stored form)."""
    form = value.lstrip(b"0123456789")
    raw = zlib.decompress(form[1:]) if form[:1] == b"z" else form[1:]
    return raw.decode("utf-8", "surrogatepass")


def _packed(c: Comparison, size: int) -> list[bytes]:
    """The append script's arguments for one comparison: its list entry (its JSON size and its three slots), then
    digest and stored form of each text (both empty for a short text, which its slot holds)."""
    slots, args = [], []
    for text in (_utf8(t) for t in (c.prompt, c.chosen, c.rejected)):
        if len(text) < INLINE_BELOW:
            slots.append(b"'" + bytes([len(text)]) + text)
            args += [b"", b""]
        else:
            digest = hashlib.blake2b(text, digest_size=DIGEST_BYTES).digest()
            slots.append(b"#" + digest)
            args += [digest, _stored_form(text)]
    return [b"=%d:%b" % (size, b"".join(slots)), *args]


def _is_entry(raw: bytes) -> bool:
    """A comparison stored as digests (the other kind is the JSON written before texts were stored once)."""
    return raw[:1] == b"="


def _text_of(value: bytes | None) -> str:
    if value is None:  # an entry's texts are written by the script that writes the entry, and go after it
        raise RedisError("a stored comparison refers to a text that is not stored")
    return stored_text(value)


def _slots(raw: bytes) -> list[bytes]:
    """An entry's three slots: b"#" + a digest, or b"'" + length + a short text."""
    out, pos = [], raw.index(b":") + 1
    while pos < len(raw):
        end = pos + 1 + DIGEST_BYTES if raw[pos] == ord("#") else pos + 2 + raw[pos + 1]
        out.append(raw[pos:end])
        pos = end
    return out


def _digests(raw: bytes) -> list[bytes]:
    """The digests of the texts an entry refers to (not its inline ones)."""
    return [s[1:] for s in _slots(raw) if s[:1] == b"#"]


def _slot_text(slot: bytes, texts: Mapping[bytes, bytes | None]) -> str:
    if slot[:1] == b"#":
        return _text_of(texts.get(slot[1:]))
    return slot[2:].decode("utf-8", "surrogatepass")


def parse_comparisons(raw: Sequence[bytes], texts: Mapping[bytes, bytes | None]) -> list[Comparison]:
    """Comparisons from the user's list entries and their text hash (for tools and tests reading Redis directly)."""
    out = []
    for v in raw:
        if _is_entry(v):
            p, c, r = (_slot_text(s, texts) for s in _slots(v))
            out.append(Comparison(p, c, r))
        else:
            out.append(Comparison.from_json(v))
    return out
