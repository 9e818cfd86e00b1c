"""L2: the Redis-protocol cache (DragonflyDB in production, Redis or Valkey in tests).

Keys (``P`` is the configured prefix, ``S`` the canonical symbol; the braces make ``{S}`` a
Redis Cluster hash tag, so every key of one symbol lives in one slot and the write script's
keys never cross slots)::

    P:v1:{S}:tick:<source>            latest tick of one source            string, JSON
    P:v1:{S}:tick                     latest tick of any source            string, JSON
    P:v1:{S}:of:<source>              latest order flow of one source      string, JSON
    P:v1:{S}:of                       latest order flow of any source      string, JSON
    P:v1:{S}:candles:<tf>:<source>    the newest ``ring_size`` candles     ZSET, score = bucket
                                                                            start, member = JSON
    P:v1:{S}:cfloor:<tf>:<source>     bucket start of the oldest candle     string, integer
                                      the database holds, while the ring
                                      still reaches back to it ("complete")
    P:v1:bus                          pub/sub channel of the cache bus      (see ``bus.py``)

Values are the version-1 JSON objects of :mod:`data_manager.cache.codec`; each data type
has its own TTL, refreshed by every accepted write.

Every write goes through one Lua script, :data:`WRITE_SCRIPT`, called with ``EVALSHA``
(falling back to ``EVAL`` when the server has not cached it, e.g. after a restart) in a
pipeline: one call per candle or candle series, and one call for all the latest values of
a batch (per item on a cluster, whose calls must keep their keys in one hash slot):

* latest values are compare-and-set on the timestamp: an older value never replaces a
  newer one, whatever order writes arrive in; a tie is settled by the order of
  :func:`~data_manager.cache.codec.tie_rank` (source, then ``seq``, then content for a tick;
  source, then ``window_ms`` for order flow), read out of the stored JSON, and an equal rank
  goes to the later write — the rule of the L1 cache and the bus, so every tier settles on
  the same value;
* a value read from the database for one source (``put_ticks(..., per_source=True)``) is
  compare-and-set into that source's key only: it says nothing about other sources, so it
  must never create the any-source key (after a restart that would make one source's tick
  the symbol's newest while another source has a newer one);
* a live candle upserts its bucket, but a closed candle is never replaced by a forming one,
  and a candle older than the ring is refused unless the ring is complete — otherwise the
  ring would show a gap the database does not have; a backfill (:meth:`RedisCache.put_candles`)
  only adds buckets the ring lacks or closes forming ones, and the ring is trimmed to
  ``ring_size``;
* a series reset (:meth:`RedisCache.reset_candles_op`) deletes a ring and its floor.

DragonflyDB compatibility: the script passes every key it touches in ``KEYS`` (Dragonfly
refuses undeclared keys), runs on Lua 5.1 (Redis) and 5.4 (Dragonfly) alike, and reads the
JSON it stores with ``string.match`` rather than ``cjson``. Only plain commands are used
(GET, MGET, SET PX, ZADD, ZRANGE, ZRANGEBYSCORE, ZREMRANGEBYSCORE, ZREMRANGEBYRANK, ZCARD,
PEXPIRE, DEL, PUBLISH, SUBSCRIBE, PING, INFO, EVALSHA/EVAL, SCRIPT LOAD). ``get_ticks``
uses MGET across symbols, which Redis Cluster would refuse (cross-slot); on a cluster it
must become one GET per symbol in a pipeline.

Degradation: every call passes a :class:`~data_manager.breaker.CircuitBreaker`. While it is
open, calls raise :class:`CacheUnavailableError` at once without any I/O; after its reset
timeout one probe call goes through, and the first answer closes it again — no restart.
The first failure of an incident is logged at WARNING with the traceback, later ones are
only counted until a call succeeds (logged at INFO). Every network operation is bounded:
``connect_timeout`` for a new connection, ``socket_timeout`` for each read and write, and
``pool_timeout`` to wait for a free pooled connection. redis-py's own retries are disabled:
the breaker, not a retry loop, decides when to try again.

After ``os.fork()`` call :meth:`RedisCache.reset_after_fork` in the child: it abandons the
inherited connections without touching them and builds a fresh pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeAlias, cast

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import (
    AbstractConnection,
    SSLConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    NoScriptError,
    RedisError,
    ResponseError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from data_manager.breaker import CircuitBreaker
from data_manager.cache.codec import (
    CacheItem,
    decode_candle,
    decode_order_flow,
    decode_tick,
    encode_candle,
    encode_order_flow,
    encode_tick,
)
from data_manager.clock import Clock, SystemClock
from data_manager.errors import (
    CacheError,
    CacheUnavailableError,
    ConfigurationError,
    DataManagerError,
)
from data_manager.models import CandleData, OrderFlowMetrics, TickData
from data_manager.strategy import MAX_SECONDS

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
    from pathlib import Path

    from data_manager.settings import DragonflySettings

__all__ = [
    "WRITE_SCRIPT",
    "WRITE_SCRIPT_SHA",
    "RedisCache",
    "RedisCacheStats",
    "WriteOp",
    "map_redis_errors",
]

logger = logging.getLogger(__name__)

#: The single L2 write script. See the module docstring for what it guarantees.
WRITE_SCRIPT: Final = r"""
-- data_manager L2 write script, schema v1. Runs unchanged on Redis/Valkey (Lua 5.1) and
-- DragonflyDB (Lua 5.4): it touches only KEYS, and reads stored JSON with string patterns.
local op, ttl = ARGV[1], ARGV[2]
-- The order of two latest values with the same timestamp, -1, 0 or 1; what
-- data_manager.cache.codec.tie_rank computes from the models, here read out of the JSON.
-- Strings compare bytewise (UTF-8 byte order is code point order; Lua's own string
-- comparison follows the server's locale), integers by length then digits (seq and
-- window_ms are int64, beyond what 5.1's doubles hold), other numbers as numbers; a missing
-- or null member ranks lowest. Only called on a tie, so the common write never pays for it.
local function bytes(a, b)
  if a == b then return 0 end
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y and -1 or 1 end
  end
  return #a < #b and -1 or 1
end
local function token(json, name)
  local t = string.match(json, '"' .. name .. '"%s*:%s*([^,}%s]+)')
  if t == 'null' then return nil end
  return t
end
local function source(json)
  local plain = string.match(json, '"source"%s*:%s*"([^"\\]*)"')
  if plain then return plain end
  -- Escaped: unescape it (a source is printable text, so only \" and \\ occur).
  local _, last = string.find(json, '"source"%s*:%s*"')
  local out, i = {}, (last or #json) + 1
  while i <= #json do
    local c = string.sub(json, i, i)
    if c == '"' then break end
    if c == '\\' then
      i = i + 1
      c = string.sub(json, i, i)
    end
    out[#out + 1] = c
    i = i + 1
  end
  return table.concat(out)
end
local function integer(a, b, name)
  local x, y = token(a, name) or '', token(b, name) or ''
  if #x ~= #y then return #x < #y and -1 or 1 end
  return bytes(x, y)
end
local function rank(a, b)
  local c = bytes(source(a), source(b))
  if c ~= 0 then return c end
  if string.find(a, '"type"%s*:%s*"order_flow"') then
    return integer(a, b, 'window_ms')
  end
  c = integer(a, b, 'seq')
  if c ~= 0 then return c end
  for _, name in ipairs({'bid', 'ask', 'bid_size', 'ask_size', 'last_price', 'last_size',
                         'volume'}) do
    local x, y = tonumber(token(a, name) or ''), tonumber(token(b, name) or '')
    if x ~= y then
      if x == nil or (y ~= nil and x < y) then return -1 end
      return 1
    end
  end
  return bytes(token(a, 'aggressor') or '', token(b, 'aggressor') or '')
end
-- Latest value: compare-and-set of one item on its per-source and any-source keys (or on
-- the per-source key alone): a newer timestamp wins, an equal one goes by rank, an equal
-- rank to the later write. Returns 1 if it stored the first key, plus 2 if it stored the
-- second.
local function latest(keys, px, ts, value)
  local stored = 0
  for i = 1, #keys do
    local cur = redis.call('GET', keys[i])
    local wins = true
    if cur then
      local cts = tonumber(string.match(cur, '"timestamp"%s*:%s*(%d+)'))
      if cts and ts ~= cts then
        wins = ts > cts
      elseif cts then
        wins = rank(value, cur) >= 0
      end
    end
    if wins then
      redis.call('SET', keys[i], value, 'PX', px)
      stored = stored + i
    end
  end
  return stored
end
if op == 'L' then
  -- One item. KEYS: per-source key, any-source key. ARGV: 'L', ttl ms, timestamp, value.
  return latest(KEYS, ttl, tonumber(ARGV[3]), ARGV[4])
end
if op == 'S' then
  -- One item read for its source only: its per-source key, never the any-source key.
  -- KEYS: per-source key. ARGV: 'S', ttl ms, timestamp, value.
  return latest({KEYS[1]}, ttl, tonumber(ARGV[3]), ARGV[4])
end
if op == 'M' then
  -- Many items, in order. KEYS: the two keys of each item. ARGV: 'M', then per item
  -- ttl ms, timestamp, value (as for 'L'). Returns how many items stored anything.
  local stored, a = 0, 2
  for k = 1, #KEYS, 2 do
    if latest({KEYS[k], KEYS[k + 1]}, ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2]) > 0 then
      stored = stored + 1
    end
    a = a + 3
  end
  return stored
end
if op == 'D' then
  -- A candle series whose live writes were given up: drop its ring and floor, so the next
  -- read refills it from the database instead of serving a gap. KEYS: ring, floor.
  return redis.call('DEL', KEYS[1], KEYS[2])
end
-- Candles. KEYS: ring (ZSET scored by bucket start), floor (bucket start of the oldest
-- candle the database has; the ring is complete while its oldest member is at the floor).
-- ARGV: 'C' (live) or 'B' (backfill), ttl ms, ring size, complete '1'/'0', then
-- (bucket start, closed '1'/'0', value) for each candle; 'C' carries exactly one.
local ring, floor = KEYS[1], KEYS[2]
local size = tonumber(ARGV[3])
local first = redis.call('ZRANGE', ring, 0, 0, 'WITHSCORES')[2]
local oldest = first and tonumber(first)
local stored = 0
if op == 'C' then
  local ts, closed, value = ARGV[5], ARGV[6], ARGV[7]
  local cur = redis.call('ZRANGEBYSCORE', ring, ts, ts)[1]
  if cur then
    if closed == '0' and not string.find(cur, '"is_closed"%s*:%s*false') then
      return 0
    end
    redis.call('ZREMRANGEBYSCORE', ring, ts, ts)
  elseif oldest and tonumber(ts) < oldest then
    local complete = tonumber(redis.call('GET', floor) or '') == oldest
    if not complete or redis.call('ZCARD', ring) >= size then
      -- Older than a ring that cannot take it: the database has a candle older than the
      -- ring's oldest now, so the ring is not complete (if it was).
      redis.call('DEL', floor)
      return 0
    end
    redis.call('SET', floor, ts, 'PX', ttl)
  end
  redis.call('ZADD', ring, ts, value)
  stored = 1
else
  local highest = nil
  for i = 5, #ARGV, 3 do
    local t = tonumber(ARGV[i])
    if not highest or t > highest then
      highest = t
    end
  end
  if oldest and highest and highest < oldest then
    -- The backfill ends before the ring begins: candles between the two (written but not
    -- stored yet, say) may be in neither, so they are not joined; the ring stays, no
    -- longer complete.
    redis.call('DEL', floor)
    return 0
  end
  local lowest, lowest_ts = nil, nil
  for i = 5, #ARGV, 3 do
    local ts, closed, value = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    local cur = redis.call('ZRANGEBYSCORE', ring, ts, ts)[1]
    if not cur or (closed == '1' and string.find(cur, '"is_closed"%s*:%s*false')) then
      if cur then
        redis.call('ZREMRANGEBYSCORE', ring, ts, ts)
      end
      redis.call('ZADD', ring, ts, value)
      stored = stored + 1
    end
    local t = tonumber(ts)
    if not lowest or t < lowest then
      lowest, lowest_ts = t, ts
    end
  end
  -- Completeness follows whichever side supplied the oldest candle.
  if lowest and (not oldest or lowest <= oldest) then
    if ARGV[4] == '1' then
      redis.call('SET', floor, lowest_ts, 'PX', ttl)
    else
      redis.call('DEL', floor)
    end
  end
end
local n = redis.call('ZCARD', ring)
if n > size then
  redis.call('ZREMRANGEBYRANK', ring, 0, n - size - 1)
end
redis.call('PEXPIRE', ring, ttl)
redis.call('PEXPIRE', floor, ttl)
return stored
"""

#: SHA1 of :data:`WRITE_SCRIPT`, the name ``EVALSHA`` knows it by.
WRITE_SCRIPT_SHA: Final = hashlib.sha1(WRITE_SCRIPT.encode(), usedforsecurity=False).hexdigest()

_PREFIX_RE: Final = re.compile(r"^[A-Za-z0-9_.\-]{1,32}$")
_DRIVER_ERRORS: Final = (RedisError, OSError)
_NO_RETRY: Final = Retry(NoBackoff(), 0)
_EVALSHA: Final = ("EVALSHA", WRITE_SCRIPT_SHA)
_EVAL: Final = ("EVAL", WRITE_SCRIPT)
# hiredis's stub types the argument as a 1-tuple; it takes any tuple of str/bytes/int.
_pack: Final = cast("Callable[[tuple[str | bytes | int, ...]], bytes]", hiredis.pack_command)
#: One call of the write script: the arguments after the SHA.
_Call: TypeAlias = tuple[str | bytes | int, ...]


def _script_calls(ops: Sequence[WriteOp]) -> list[_Call]:
    """The script calls (arguments after the SHA) that carry out ``ops`` on one server.

    Every live latest-value write goes into one ``M`` call, in order, so a batch of N ticks
    costs one reply to read instead of N; other calls (candles, per-source fills) go as they
    are. (A cluster cannot do this:
    one call's keys must share a hash slot.)
    """
    keys: list[str | bytes | int] = []
    argv: list[str | bytes | int] = ["M"]
    calls: list[_Call] = []
    single: _Call = ()
    for op in ops:
        args = op.args
        if args[3] == "L":
            single = args
            keys += args[1:3]
            argv += args[4:]
        else:
            calls.append(args)
    if len(keys) == 2:
        calls.append(single)
    elif keys:
        calls.append((len(keys), *keys, *argv))
    return calls


async def _run_script_calls(
    run: Callable[[Sequence[_Call]], Awaitable[list[Any]]],
    calls: Sequence[_Call],
    publish: tuple[str, bytes] | None = None,
) -> None:
    """Send ``calls`` of the write script (then the PUBLISH) through ``run``, one pipeline.

    A call the server answers with NOSCRIPT (it lost its script cache: restart, failover,
    SCRIPT FLUSH) is sent again with ``EVAL``, which caches the script. ``run`` sends a
    pipeline and returns its replies, error replies included.

    Raises:
        Whatever ``run`` raises, and the first error reply.
    """
    commands = [_EVALSHA + call for call in calls]
    if publish is not None:
        commands.append(("PUBLISH", *publish))
    results = await run(commands)
    missing = [
        call for call, r in zip(calls, results, strict=False) if isinstance(r, NoScriptError)
    ]
    if missing:
        results = [r for r in results if not isinstance(r, NoScriptError)]
        results += await run([_EVAL + call for call in missing])
    for result in results:
        if isinstance(result, Exception):
            raise result


def _translate(exc: BaseException, target: str) -> CacheError:
    """The SDK error for a driver exception (connection/timeout → unavailable)."""
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
        return CacheUnavailableError(f"L2 cache {target} unavailable: {type(exc).__name__}: {exc}")
    return CacheError(f"L2 cache {target} failed: {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def map_redis_errors(target: str) -> Iterator[None]:
    """Translate redis-py and socket errors raised inside the block into the SDK's tree.

    Connection errors and timeouts become :class:`CacheUnavailableError`; any other Redis
    error (a refused command, a wrong key type, a script error) becomes :class:`CacheError`.
    Both are chained to the driver exception.

    Args:
        target: ``redis host:port/db`` for the message; never contains a password.
    """
    try:
        yield
    except DataManagerError:
        raise
    except _DRIVER_ERRORS as exc:
        raise _translate(exc, target) from exc


class WriteOp(NamedTuple):
    """One call of the write script: the encoded value and the ``EVALSHA`` arguments
    after the SHA (``numkeys, *keys, *argv``)."""

    payload: bytes
    args: tuple[str | bytes | int, ...]


@dataclass(frozen=True, slots=True)
class RedisCacheStats:
    """A snapshot of the L2 counters."""

    hits: int
    misses: int
    errors: int
    short_circuited: int
    writes: int
    incidents: int
    breaker_state: str
    breaker_opens: int = 0


class _Counters:
    __slots__ = ("errors", "hits", "incidents", "misses", "short_circuited", "writes")

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.short_circuited = 0
        self.writes = 0
        self.incidents = 0


#: How long :attr:`RedisCache.write_refused` reports a refused write.
REFUSAL_MEMORY_SECONDS: Final = 60.0


def _ms(seconds: float, name: str) -> str:
    if not 0 < seconds <= MAX_SECONDS:
        msg = f"L2 {name} must be > 0 and <= {MAX_SECONDS:g} seconds, got {seconds}"
        raise ConfigurationError(msg)
    return str(max(1, round(seconds * 1000)))


class RedisCache:
    """The L2 cache on a Redis-protocol server (async, redis-py with hiredis).

    Symbols must be in canonical form (:func:`~data_manager.models.normalize_symbol`); the
    router normalises them once before they get here.

    Args:
        url: ``redis://[user:password@]host:port/db`` or ``rediss://...``; when given, it
            overrides ``host``, ``port``, ``db``, ``username``, ``password`` and ``ssl``.
        host: Server host.
        port: Server port.
        db: Database number.
        username: ACL user (Redis 6+).
        password: Password; never logged.
        ssl: Use TLS.
        ssl_ca_certs: CA bundle for TLS.
        key_prefix: First segment of every key (``[A-Za-z0-9_.-]{1,32}``).
        socket_timeout: Seconds allowed for each socket read or write.
        connect_timeout: Seconds allowed to open a connection.
        max_connections: Size of the connection pool.
        pool_timeout: Seconds to wait for a free pooled connection (default:
            ``socket_timeout``).
        tick_ttl: TTL of the latest-tick keys, seconds.
        candle_ttl: TTL of candle rings, seconds.
        order_flow_ttl: TTL of the latest-order-flow keys, seconds.
        ring_size: Candles kept per (symbol, timeframe, source).
        breaker: The cache-side circuit breaker; default: 5 consecutive failures open it for
            2 seconds.
        clock: Time source of the default breaker.
        client_name: Shown by ``CLIENT LIST`` on the server.

    Raises:
        ConfigurationError: A TTL, size or prefix is invalid.
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        host: str = "127.0.0.1",
        port: int = 6379,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        ssl: bool = False,
        ssl_ca_certs: str | Path | None = None,
        key_prefix: str = "dm",
        socket_timeout: float = 0.5,
        connect_timeout: float = 1.0,
        max_connections: int = 50,
        pool_timeout: float | None = None,
        tick_ttl: float = 3600.0,
        candle_ttl: float = 3600.0,
        order_flow_ttl: float = 3600.0,
        ring_size: int = 500,
        breaker: CircuitBreaker | None = None,
        clock: Clock | None = None,
        client_name: str | None = "data_manager",
    ) -> None:
        if not _PREFIX_RE.match(key_prefix):
            msg = f"L2 key_prefix {key_prefix!r} must match [A-Za-z0-9_.-]{{1,32}}"
            raise ConfigurationError(msg)
        if ring_size < 1 or max_connections < 1:
            msg = f"L2 ring_size ({ring_size}) and max_connections ({max_connections}) must be >= 1"
            raise ConfigurationError(msg)
        if not (socket_timeout > 0 and connect_timeout > 0):
            msg = "L2 socket_timeout and connect_timeout must be > 0"
            raise ConfigurationError(msg)
        self._tick_ttl = _ms(tick_ttl, "tick_ttl")
        self._candle_ttl = _ms(candle_ttl, "candle_ttl")
        self._order_flow_ttl = _ms(order_flow_ttl, "order_flow_ttl")
        self._ring_size = ring_size
        self._ring_arg = str(ring_size)
        self._prefix = key_prefix
        self._channel = f"{key_prefix}:v1:bus"

        kwargs: dict[str, Any] = {
            "host": host,
            "port": port,
            "db": db,
            "username": username,
            "password": password,
        }
        if ssl:
            kwargs["connection_class"] = SSLConnection
        if url is not None:
            try:
                kwargs.update(parse_url(url))
            except ValueError as exc:
                msg = f"invalid L2 cache URL: {exc}"
                raise ConfigurationError(msg) from None
        if kwargs.get("connection_class") is SSLConnection and ssl_ca_certs is not None:
            kwargs["ssl_ca_certs"] = str(ssl_ca_certs)
        if "path" in kwargs:  # unix:// socket: no host, port or TCP options
            for tcp_only in ("host", "port"):
                kwargs.pop(tcp_only, None)
        else:
            kwargs["socket_keepalive"] = True
        kwargs.update(
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            retry=_NO_RETRY,
            client_name=client_name,
            # RESP2: plain replies on every server (redis-py 8 would negotiate RESP3), and
            # pub/sub messages arrive as ordinary arrays on the bus's raw connection.
            protocol=2,
        )
        self._conn_kwargs = kwargs
        self._max_connections = max_connections
        self._pool_timeout = socket_timeout if pool_timeout is None else pool_timeout
        self._socket_timeout = socket_timeout
        self._connect_timeout = connect_timeout
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        #: ``redis host:port/db`` for messages; never contains the password.
        self.target = f"redis {where}/{kwargs.get('db', 0)}"
        self._clock: Clock = clock or SystemClock()
        self._breaker = breaker or CircuitBreaker(
            "l2", failure_threshold=5, reset_timeout=2.0, clock=self._clock
        )
        self._counters = _Counters()
        self._incident = False
        self._write_refused: tuple[float, str] | None = None  # (monotonic time, answer)
        self._closed = False
        # Objects inherited across a fork: kept referenced (never closed, never collected)
        # so nothing in the child touches the parent's sockets or event loop.
        self._abandoned: list[object] = []
        self._client: Redis = self._make_client()
        # The cache bus's own connection (see apply): outside the pool, one pipeline at a time.
        self._writer: AbstractConnection | None = None
        self._writer_busy = False

    @classmethod
    def from_settings(
        cls,
        settings: DragonflySettings,
        *,
        tick_ttl: float = 3600.0,
        candle_ttl: float = 3600.0,
        order_flow_ttl: float = 3600.0,
        ring_size: int = 500,
        breaker: CircuitBreaker | None = None,
        clock: Clock | None = None,
    ) -> RedisCache:
        """Build from :class:`~data_manager.settings.DragonflySettings` plus the strategy's
        cache values.

        Raises:
            ConfigurationError: A value is invalid or the password file is unreadable.
        """
        return cls(
            host=settings.host,
            port=settings.port,
            db=settings.db,
            username=settings.username,
            password=settings.resolved_password(),
            ssl=settings.ssl,
            ssl_ca_certs=settings.ssl_ca_certs,
            key_prefix=settings.key_prefix,
            socket_timeout=settings.socket_timeout,
            connect_timeout=settings.connect_timeout,
            max_connections=settings.pool_max,
            tick_ttl=tick_ttl,
            candle_ttl=candle_ttl,
            order_flow_ttl=order_flow_ttl,
            ring_size=ring_size,
            breaker=breaker,
            clock=clock,
        )

    def _make_client(self) -> Redis:
        # Building a pool does no I/O and binds to no event loop until first use.
        pool = BlockingConnectionPool(
            max_connections=self._max_connections,
            timeout=self._pool_timeout,
            **self._conn_kwargs,
        )
        return Redis.from_pool(pool)

    # ------------------------------------------------------------------ properties

    @property
    def key_prefix(self) -> str:
        """First segment of every key."""
        return self._prefix

    @property
    def channel(self) -> str:
        """The cache bus's pub/sub channel, ``<prefix>:v1:bus``."""
        return self._channel

    @property
    def ring_size(self) -> int:
        """Candles kept per (symbol, timeframe, source)."""
        return self._ring_size

    @property
    def breaker(self) -> CircuitBreaker:
        """The cache-side circuit breaker."""
        return self._breaker

    @property
    def breaker_state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"``."""
        return self._breaker.state.value

    @property
    def socket_timeout(self) -> float:
        """Seconds allowed for each socket read or write."""
        return self._socket_timeout

    @property
    def connect_timeout(self) -> float:
        """Seconds allowed to open a connection."""
        return self._connect_timeout

    @property
    def client(self) -> Redis:
        """The underlying redis-py client (for diagnostics and tests)."""
        return self._client

    def stats(self) -> RedisCacheStats:
        """Hits, misses, errors, short-circuited calls, writes and the breaker state."""
        c = self._counters
        return RedisCacheStats(
            hits=c.hits,
            misses=c.misses,
            errors=c.errors,
            short_circuited=c.short_circuited,
            writes=c.writes,
            incidents=c.incidents,
            breaker_state=self.breaker_state,
            breaker_opens=self._breaker.opened_count,
        )

    def configure(
        self,
        *,
        tick_ttl: float | None = None,
        candle_ttl: float | None = None,
        order_flow_ttl: float | None = None,
    ) -> None:
        """Change the TTLs of later writes (strategy hot reload); ``None`` keeps a value.

        Raises:
            ConfigurationError: A TTL that is not > 0 (then nothing changes).
        """
        tick = self._tick_ttl if tick_ttl is None else _ms(tick_ttl, "tick_ttl")
        candle = self._candle_ttl if candle_ttl is None else _ms(candle_ttl, "candle_ttl")
        flow = (
            self._order_flow_ttl
            if order_flow_ttl is None
            else _ms(order_flow_ttl, "order_flow_ttl")
        )
        self._tick_ttl, self._candle_ttl, self._order_flow_ttl = tick, candle, flow

    # ------------------------------------------------------------------ keys

    def tick_key(self, symbol: str, source: str | None = None) -> str:
        """Key of the latest tick of ``symbol`` (from ``source``, or any source)."""
        if source is None:
            return f"{self._prefix}:v1:{{{symbol}}}:tick"
        return f"{self._prefix}:v1:{{{symbol}}}:tick:{source}"

    def order_flow_key(self, symbol: str, source: str | None = None) -> str:
        """Key of the latest order flow of ``symbol`` (from ``source``, or any source)."""
        if source is None:
            return f"{self._prefix}:v1:{{{symbol}}}:of"
        return f"{self._prefix}:v1:{{{symbol}}}:of:{source}"

    def candle_key(self, symbol: str, timeframe: str, source: str) -> str:
        """Key of the candle ring of (symbol, timeframe, source)."""
        return f"{self._prefix}:v1:{{{symbol}}}:candles:{timeframe}:{source}"

    def candle_floor_key(self, symbol: str, timeframe: str, source: str) -> str:
        """Key of the ring's completeness floor."""
        return f"{self._prefix}:v1:{{{symbol}}}:cfloor:{timeframe}:{source}"

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        """Check the server answers and load the write script.

        Raises:
            CacheUnavailableError: The server is unreachable, too slow, or the breaker is open.
            CacheError: The server refused the script.
        """
        self._admit()
        try:
            await self._client.ping()
            sha = await self._client.script_load(WRITE_SCRIPT)
        except _DRIVER_ERRORS as exc:
            raise self._failure(exc) from exc
        self._ok()
        if sha != WRITE_SCRIPT_SHA:  # pragma: no cover - a server that hashes differently
            msg = f"L2 cache {self.target} returned script SHA {sha!r}, expected {WRITE_SCRIPT_SHA}"
            raise CacheError(msg)

    async def aclose(self) -> None:
        """Close every pooled connection. Later calls raise :class:`CacheUnavailableError`."""
        if self._closed:
            return
        self._closed = True
        writer, self._writer = self._writer, None
        with map_redis_errors(self.target):
            if writer is not None:
                await writer.disconnect(nowait=True)
            await self._client.aclose()

    def reset_after_fork(self) -> None:
        """Forget the parent's connections in a forked child; the next call opens new ones.

        The inherited pool is neither closed nor garbage-collected: closing it would act on
        sockets (and, through the event loop, an epoll set) shared with the parent.
        """
        self._abandoned.append(self._client)
        self._client = self._make_client()
        if self._writer is not None:
            self._abandoned.append(self._writer)
            self._writer = None
        self._writer_busy = False
        self._breaker.reset()
        self._incident = False
        self._closed = False
        self._counters = _Counters()

    def new_connection(self) -> AbstractConnection:
        """A new, unconnected connection with this cache's settings, outside the pool.

        The cache bus uses one for its subscription, which holds a connection for good.
        """
        pool = self._client.connection_pool
        return pool.connection_class(**pool.connection_kwargs)

    # ------------------------------------------------------------------ breaker plumbing

    def _admit(self) -> None:
        """Refuse the call without I/O when closed or while the breaker is open."""
        if self._closed:
            msg = f"L2 cache {self.target} is closed"
            raise CacheUnavailableError(msg)
        if not self._breaker.allow():
            self._counters.short_circuited += 1
            msg = f"L2 cache {self.target} circuit is open; call not attempted"
            raise CacheUnavailableError(msg)

    def _ok(self) -> None:
        self._breaker.record_success()
        if self._incident:
            self._incident = False
            logger.info(
                "L2 cache %s answers again (%d errors so far)", self.target, self._counters.errors
            )

    @property
    def write_refused(self) -> str | None:
        """The server's answer to the last write it refused (memory full under
        ``noeviction``, a key of another type, a value out of range) within the last
        ``REFUSAL_MEMORY_SECONDS``, or None. The server still answers then, so the breaker
        stays closed and reads go on: this is how health tells that L2 keeps older values
        than the routers wrote. Writes of other keys that succeed meanwhile do not clear it:
        a refusal may concern one key or one node only."""
        refused = self._write_refused
        if refused is None or self._clock.monotonic() - refused[0] >= REFUSAL_MEMORY_SECONDS:
            return None
        return refused[1]

    def _write_failure(self, exc: BaseException) -> CacheError:
        """:meth:`_failure` for a write, remembering a refusal for :attr:`write_refused`."""
        err = self._failure(exc)
        if not isinstance(err, CacheUnavailableError):
            self._write_refused = (self._clock.monotonic(), str(err))
        return err

    def _failure(self, exc: BaseException) -> CacheError:
        """Count a failed call, tell the breaker, log the incident once; return the error
        to raise."""
        err = exc if isinstance(exc, CacheError) else _translate(exc, self.target)
        self._counters.errors += 1
        if isinstance(err, CacheUnavailableError):
            self._breaker.record_failure()
        else:
            # The server answered (a refused command, a malformed value): it is reachable.
            self._breaker.record_success()
        if not self._incident:
            self._incident = True
            self._counters.incidents += 1
            logger.warning(
                "L2 cache %s failed; reads fall back to the database until it answers "
                "again (further errors are only counted)",
                self.target,
                exc_info=exc,
            )
        return err

    # ------------------------------------------------------------------ reads

    async def ping(self) -> float:
        """Round-trip a PING.

        Returns:
            The latency in milliseconds.

        Raises:
            CacheUnavailableError: Unreachable, too slow, or the breaker is open.
        """
        self._admit()
        start = time.perf_counter()
        try:
            await self._client.ping()
        except _DRIVER_ERRORS as exc:
            raise self._failure(exc) from exc
        elapsed = (time.perf_counter() - start) * 1000.0
        self._ok()
        return elapsed

    async def info_version(self) -> str:
        """The server product and version, e.g. ``"dragonfly df-v1.21.2"`` or ``"redis 7.0.15"``.

        Raises:
            CacheUnavailableError: Unreachable, too slow, or the breaker is open.
        """
        self._admit()
        try:
            info: Mapping[str, Any] = await self._client.info("server")
        except _DRIVER_ERRORS as exc:
            raise self._failure(exc) from exc
        self._ok()
        for product in ("dragonfly", "valkey"):
            version = info.get(f"{product}_version")
            if version:
                return f"{product} {version}"
        return f"redis {info.get('redis_version', 'unknown')}"

    async def get_tick(self, symbol: str, source: str | None = None) -> TickData | None:
        """The latest tick of ``symbol`` (from ``source``, or any source), or None on a miss.

        Raises:
            CacheUnavailableError: Unreachable, too slow, or the breaker is open.
            CacheError: The server refused the call or the stored value is malformed.
        """
        key = self.tick_key(symbol, source)
        self._admit()
        try:
            raw = await self._command("GET", key)
        except _DRIVER_ERRORS as exc:
            raise self._failure(exc) from exc
        self._ok()
        if raw is None:
            self._counters.misses += 1
            return None
        try:
            tick = decode_tick(raw)
        except CacheError as exc:
            raise self._failure(exc) from exc
        self._counters.hits += 1
        return tick

    async def get_ticks(self, symbols: Sequence[str]) -> dict[str, TickData]:
        """The latest tick (any source) of each symbol, in one round trip (MGET).

        Returns:
            Symbol → tick for the symbols L2 holds; absent symbols are misses.

        Raises:
            CacheUnavailableError: Unreachable, too slow, or the breaker is open.
            CacheError: The server refused the call or a stored value is malformed.
        """
        if not symbols:
            return {}
        keys = [self.tick_key(s) for s in symbols]
        self._admit()
        try:
            raws = await self._command("MGET", *keys)
        except _DRIVER_ERRORS as exc:
            raise self._failure(exc) from exc
        self._ok()
        out: dict[str, TickData] = {}
        try:
            for symbol, raw in zip(symbols, raws, strict=True):
                if raw is not None:
                    out[symbol] = decode_tick(raw)
        except CacheError as exc:
            raise self._failure(exc) from exc
        self._counters.hits += len(out)
        self._counters.misses += len(symbols) - len(out)
        return out

    async def get_order_flow(
        self, symbol: str, source: str | None = None
    ) -> OrderFlowMetrics | None:
        """The latest order flow of ``symbol`` (from ``source``, or any source), or None.

        Raises:
            CacheUnavailableError: Unreachable, too slow, or the breaker is open.
            CacheError: The server refused the call or the stored value is malformed.
        """
        key = self.order_flow_key(symbol, source)
        self._admit()
        try:
            raw = await self._command("GET", key)
        except _DRIVER_ERRORS as exc:
            raise self._failure(exc) from exc
        self._ok()
        if raw is None:
            self._counters.misses += 1
            return None
        try:
            metrics = decode_order_flow(raw)
        except CacheError as exc:
            raise self._failure(exc) from exc
        self._counters.hits += 1
        return metrics

    async def get_candles(
        self, symbol: str, timeframe: str, limit: int, source: str
    ) -> list[CandleData] | None:
        """The newest ``limit`` candles of one series, oldest to newest, or None on a miss.

        Fewer than ``limit`` candles are a hit only when the ring is complete (it reaches
        back to the oldest candle the database has); otherwise a short list would hide older
        candles, so it is a miss — the same rule as the L1 cache.

        Raises:
            CacheUnavailableError: Unreachable, too slow, or the breaker is open.
            CacheError: The server refused the call or a stored value is malformed.
        """
        if limit < 1:
            return []
        ring = self.candle_key(symbol, timeframe, source)
        floor = self.candle_floor_key(symbol, timeframe, source)
        self._admit()
        try:
            flat, floor_raw = await self._pipeline(
                [("ZRANGE", ring, -limit, -1, "WITHSCORES"), ("GET", floor)]
            )
            for reply in (flat, floor_raw):
                if isinstance(reply, ResponseError):
                    raise reply
        except _DRIVER_ERRORS as exc:
            raise self._failure(exc) from exc
        self._ok()
        members = flat[0::2]  # WITHSCORES replies member, score, member, score, ...
        try:
            if len(members) < limit and (
                not members or floor_raw is None or int(floor_raw) != int(float(flat[1]))
            ):
                self._counters.misses += 1
                return None
            candles = [decode_candle(member) for member in members]
        except (CacheError, ValueError) as exc:
            raise self._failure(exc) from exc
        self._counters.hits += 1
        return candles

    # ------------------------------------------------------------------ writes

    def write_op(self, item: CacheItem, *, per_source: bool = False) -> WriteOp:
        """The live write of one item (what the cache bus sends).

        Args:
            item: The value.
            per_source: A latest value read for its source only: write its per-source key,
                never the symbol's any-source key (ignored for candles).

        Raises:
            CacheError: ``item`` is not a TickData, CandleData or OrderFlowMetrics.
        """
        cls = type(item)
        if cls is TickData:
            tick: TickData = item  # type: ignore[assignment]
            return self._latest_op(
                encode_tick(tick),
                self.tick_key(tick.symbol, tick.source),
                None if per_source else self.tick_key(tick.symbol),
                self._tick_ttl,
                tick.timestamp,
            )
        if cls is OrderFlowMetrics:
            metrics: OrderFlowMetrics = item  # type: ignore[assignment]
            return self._latest_op(
                encode_order_flow(metrics),
                self.order_flow_key(metrics.symbol, metrics.source),
                None if per_source else self.order_flow_key(metrics.symbol),
                self._order_flow_ttl,
                metrics.timestamp,
            )
        if cls is CandleData:
            candle: CandleData = item  # type: ignore[assignment]
            payload = encode_candle(candle)
            return WriteOp(
                payload,
                (
                    2,
                    self.candle_key(candle.symbol, candle.timeframe, candle.source),
                    self.candle_floor_key(candle.symbol, candle.timeframe, candle.source),
                    "C",
                    self._candle_ttl,
                    self._ring_arg,
                    "0",
                    candle.timestamp,
                    "1" if candle.is_closed else "0",
                    payload,
                ),
            )
        msg = f"cannot cache {cls.__name__}"
        raise CacheError(msg)

    @staticmethod
    def _latest_op(payload: bytes, key: str, any_key: str | None, ttl: str, ts: int) -> WriteOp:
        if any_key is None:
            return WriteOp(payload, (1, key, "S", ttl, ts, payload))
        return WriteOp(payload, (2, key, any_key, "L", ttl, ts, payload))

    def reset_candles_op(self, symbol: str, timeframe: str, source: str) -> WriteOp:
        """The write that drops one series' ring and floor (after live writes to it were
        lost), so the next read misses and refills the ring from the database."""
        return WriteOp(
            b"",
            (
                2,
                self.candle_key(symbol, timeframe, source),
                self.candle_floor_key(symbol, timeframe, source),
                "D",
            ),
        )

    def backfill_ops(self, candles: Sequence[CandleData], *, complete: bool) -> list[WriteOp]:
        """Backfill writes for candles read from a lower tier: one call per series."""
        series: dict[tuple[str, str, str], list[CandleData]] = {}
        for candle in candles:
            series.setdefault((candle.symbol, candle.timeframe, candle.source), []).append(candle)
        ops: list[WriteOp] = []
        flag = "1" if complete else "0"
        for (symbol, timeframe, source), batch in series.items():
            args: list[str | bytes | int] = [
                2,
                self.candle_key(symbol, timeframe, source),
                self.candle_floor_key(symbol, timeframe, source),
                "B",
                self._candle_ttl,
                self._ring_arg,
                flag,
            ]
            for candle in batch:
                args += (candle.timestamp, "1" if candle.is_closed else "0", encode_candle(candle))
            ops.append(WriteOp(b"", tuple(args)))
        return ops

    async def put_ticks(self, ticks: Sequence[TickData], *, per_source: bool = False) -> None:
        """Store ticks, compare-and-set on the timestamp, in one pipeline.

        Args:
            ticks: The ticks, each under its source's key and the symbol's any-source key.
            per_source: The ticks were read for their sources only (e.g. the database's
                newest tick of one source): store them under their sources' keys only, as
                they say nothing about the symbol's newest tick.

        Raises:
            CacheUnavailableError: Unreachable, too slow, or the breaker is open.
            CacheError: The server refused a call.
        """
        if ticks:
            await self.apply([self.write_op(t, per_source=per_source) for t in ticks])

    async def put_order_flow(
        self, metrics: Sequence[OrderFlowMetrics], *, per_source: bool = False
    ) -> None:
        """Store order-flow metrics, compare-and-set on the timestamp, in one pipeline.

        Args:
            metrics: The metrics.
            per_source: Store them under their sources' keys only (see :meth:`put_ticks`).

        Raises:
            CacheUnavailableError: Unreachable, too slow, or the breaker is open.
            CacheError: The server refused a call.
        """
        if metrics:
            await self.apply([self.write_op(m, per_source=per_source) for m in metrics])

    async def put_candles(self, candles: Sequence[CandleData], *, complete: bool = False) -> None:
        """Backfill candles read from a lower tier (the database), one script call per series.

        Buckets the ring lacks are added; a forming candle in the ring is replaced by a
        closed one; any other candle the ring holds wins (live writes are at least as
        fresh). A series whose candles all end before the ring's oldest is not joined to
        it (what lies between may be in neither); its ring just stops claiming to be
        complete. Live candles go through the cache bus instead.

        Args:
            candles: Candles of one or more series, in any order.
            complete: The source has no candles older than these (it returned fewer than
                asked), so the ring may serve short lists.

        Raises:
            CacheUnavailableError: Unreachable, too slow, or the breaker is open.
            CacheError: The server refused a call.
        """
        if candles:
            await self.apply(self.backfill_ops(candles, complete=complete))

    async def apply(
        self,
        ops: Sequence[WriteOp],
        *,
        publish: tuple[str, bytes] | None = None,
        own_connection: bool = False,
    ) -> None:
        """Run write-script calls, then optionally one PUBLISH, in a single pipeline.

        The PUBLISH comes last, so a subscriber that reads L2 after the message sees the
        values it announces.

        Args:
            ops: The write-script calls.
            publish: ``(channel, message)`` to publish after them.
            own_connection: Send on the cache's write connection, which stays outside the
                pool (the cache bus's sender, one batch at a time): no pool checkout per
                batch, and never a wait behind reads that hold every pooled connection.
                While it is busy, a pooled connection is used.

        Raises:
            CacheUnavailableError: Unreachable, too slow, or the breaker is open.
            CacheError: The server refused a call.
        """
        self._admit()
        run = self._write_pipeline if own_connection else self._pipeline
        try:
            await _run_script_calls(run, _script_calls(ops), publish)
        except _DRIVER_ERRORS as exc:
            raise self._write_failure(exc) from exc
        self._counters.writes += len(ops)
        self._ok()

    async def drop_keys(self, patterns: Sequence[str], *, slot_key: str) -> int:
        """Delete the keys matching the glob ``patterns`` (SCAN, then UNLINK); return how many.

        Every pattern must name keys of ``slot_key``'s hash slot (one symbol's keys share
        it through their ``{symbol}`` tag): on a cluster only the node serving that slot is
        scanned.

        Raises:
            redis.exceptions.RedisError: The server failed (callers map it).
        """
        keys = [k for p in patterns async for k in self._client.scan_iter(match=p, count=500)]
        if keys:
            await self._client.unlink(*keys)
        return len(keys)

    async def _command(self, *args: str | bytes | int) -> Any:
        """Run one command on a pooled connection (the read path; see :meth:`_pipeline`)."""
        pool = self._client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(_pack(args), check_health=False)
            return await conn.read_response()
        except ResponseError:
            raise  # an error reply: the connection is still in step
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)

    async def _pipeline(self, commands: Sequence[tuple[str | bytes | int, ...]]) -> list[Any]:
        """Send ``commands`` in one write and read every reply; error replies are returned.

        redis-py's own pipeline packs each argument in Python (about 20 µs per script call);
        hiredis packs a whole command in about 2 µs, which is what keeps the bus's fast path
        cheap. The replies are read under one deadline of ``socket_timeout``; on any failure
        the connection is closed before it goes back to the pool, so a half-read reply never
        reaches the next caller.
        """
        pool = self._client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            return await self._exchange(conn, commands)
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)

    async def _write_pipeline(self, commands: Sequence[tuple[str | bytes | int, ...]]) -> list[Any]:
        """:meth:`_pipeline` on the write connection (see :meth:`apply`), opened on first use
        and again after a failure closed it."""
        if self._writer_busy:
            return await self._pipeline(commands)
        conn = self._writer
        if conn is None:
            conn = self._writer = self.new_connection()
        self._writer_busy = True
        try:
            if not conn.is_connected:
                await conn.connect()  # type: ignore[no-untyped-call]
            return await self._exchange(conn, commands)
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            self._writer_busy = False

    async def _exchange(
        self, conn: AbstractConnection, commands: Sequence[tuple[str | bytes | int, ...]]
    ) -> list[Any]:
        """Send ``commands`` in one write on ``conn`` and read every reply under one deadline
        of ``socket_timeout``; error replies are returned, not raised."""
        await conn.send_packed_command(b"".join(map(_pack, commands)), check_health=False)
        replies: list[Any] = []
        async with asyncio.timeout(self._socket_timeout):
            for _ in commands:
                try:
                    replies.append(await conn.read_response(timeout=math.inf))
                except ResponseError as exc:  # an error reply: the stream stays in step
                    replies.append(exc)
        return replies
