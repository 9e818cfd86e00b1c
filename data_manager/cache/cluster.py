"""L2 on a Redis Cluster (or any server speaking its protocol, e.g. DragonflyDB in cluster mode).

:class:`ClusterRedisCache` is a :class:`~data_manager.cache.redis.RedisCache` that changes only
*where* a command goes; keys, values, the write script, the breaker and the error mapping are
those of the single-server cache.

Routing. redis-py's :class:`~redis.asyncio.cluster.RedisCluster` is used for its slot map only
(``CLUSTER SLOTS`` from the seed nodes, refreshed on demand); the commands themselves go through
one :class:`~redis.asyncio.BlockingConnectionPool` per node, packed by hiredis exactly as on a
single server. Every key of a symbol carries the symbol as hash tag (``P:v1:{S}:...``), so a
symbol's keys share one slot and a write-script call never crosses slots. One
:meth:`~ClusterRedisCache.apply` batch is split by owning node and the per-node pipelines run
concurrently; ``get_ticks`` becomes one pipeline of GETs per node instead of a cross-slot MGET.

Redirections and failures. A ``MOVED``, ``ASK``, ``TRYAGAIN`` or ``CLUSTERDOWN`` reply, or a
connection error, refreshes the slot map and retries that node's pipeline once (an ``ASK`` is
retried on the named node behind ``ASKING``). If the retry fails too, the call raises
:class:`~data_manager.errors.CacheUnavailableError`, which the breaker counts. Re-sending is
safe: every write is a compare-and-set script call, so running it twice stores the same value,
and a bus message delivered twice is applied compare-and-set by its receivers.

The breaker is the cache's single breaker, not one per node: when one master is down, the
calls that reach it fail until the breaker opens, and then every L2 call short-circuits (reads
fall back to the database, the bus drops its updates) until the probe after the reset timeout
finds the cluster answering again. Symbols on the surviving masters are served again from
then on only if the cluster keeps serving a partial slot map (Redis:
``cluster-require-full-coverage no``; otherwise every node answers ``CLUSTERDOWN`` once the
lost master is marked failed). Configure replicas to have Redis fail over instead; the next
``MOVED`` (or connection error) then refreshes the slot map and the cache follows.

Pub/sub. Classic ``PUBLISH``/``SUBSCRIBE`` is propagated to every node of a Redis Cluster, so
the cache bus publishes on the node that holds the last write of the batch (after all the
batch's writes succeeded, so a receiver reading L2 sees them) and subscribes on any one node.
:meth:`ClusterRedisCache.new_connection` hands out the known masters in turn, skipping those that
failed recently, so the bus's resubscribe loop moves to another node when its node is lost.

DragonflyDB's multi-shard cluster nodes share no state, pub/sub included: there both the
PUBLISH and the subscription go to the master owning the channel's slot
(``bus_on_channel_node``, chosen automatically when :meth:`~ClusterRedisCache.connect` finds
DragonflyDB). The bus then depends on that one master: while it is down, routers stop
hearing each other (their L1 is bypassed, as for any lost subscription) until it, or its
replica after a failover, answers again.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from typing import TYPE_CHECKING, Any, Final

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from data_manager.cache.codec import decode_tick
from data_manager.cache.redis import (
    _DRIVER_ERRORS,
    _NO_RETRY,
    WRITE_SCRIPT,
    WRITE_SCRIPT_SHA,
    RedisCache,
    WriteOp,
    _run_script_calls,
    map_redis_errors,
)
from data_manager.errors import CacheError, ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from redis.asyncio.connection import AbstractConnection

    from data_manager.breaker import CircuitBreaker
    from data_manager.clock import Clock
    from data_manager.models import TickData
    from data_manager.settings import DragonflySettings

__all__ = ["ClusterRedisCache", "parse_node"]

#: Replies that mean "this slot is (now) served elsewhere or not at all": refresh and retry.
_REDIRECTS: Final = (AskError, TryAgainError, ClusterDownError)  # AskError includes MovedError
_CONNECTION_ERRORS: Final = (RedisConnectionError, RedisTimeoutError, OSError)
#: How long a node that failed is passed over when choosing a node for the subscription.
_AVOID_SECONDS: Final = 5.0
_ASKING: Final = ("ASKING",)


def parse_node(spec: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6addr]:port"``) → ``(host, port)``.

    Raises:
        ConfigurationError: Not ``host:port`` with a port in 1..65535.
    """
    host, sep, port_text = spec.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        port = int(port_text)
    except ValueError:
        port = 0
    if "/" in host or "@" in host:
        # A URL (redis://user:password@host:port): never repeated, it may hold a password.
        msg = (
            "L2 cluster nodes are host:port; give credentials with the cache's password "
            "setting, not in a node URL"
        )
        raise ConfigurationError(msg)
    if not (sep and host and 0 < port < 65536):
        msg = f"L2 cluster node {spec!r} is not host:port"
        raise ConfigurationError(msg)
    return host, port


def _first_redirect(replies: Sequence[Any]) -> ResponseError | None:
    for reply in replies:
        if isinstance(reply, _REDIRECTS):
            return reply
    return None


class ClusterRedisCache(RedisCache):
    """The L2 cache on a Redis Cluster, configured by a list of seed nodes.

    Same API and guarantees as :class:`~data_manager.cache.redis.RedisCache`; see the module
    docstring for routing, redirections, the breaker and pub/sub on a cluster.

    Args:
        nodes: Seed nodes, ``"host:port"`` each; any reachable one is enough to learn the
            whole cluster.
        username: ACL user (Redis 6+).
        password: Password; never logged.
        ssl: Use TLS.
        ssl_ca_certs: CA bundle for TLS.
        key_prefix: First segment of every key.
        socket_timeout: Seconds allowed for each socket read or write.
        connect_timeout: Seconds allowed to open a connection.
        max_connections: Size of the connection pool of each node.
        pool_timeout: Seconds to wait for a free pooled connection.
        tick_ttl: TTL of the latest-tick keys, seconds.
        candle_ttl: TTL of candle rings, seconds.
        order_flow_ttl: TTL of the latest-order-flow keys, seconds.
        ring_size: Candles kept per (symbol, timeframe, source).
        breaker: The cache-side circuit breaker (one for the whole cluster).
        clock: Time source of the default breaker.
        client_name: Shown by ``CLIENT LIST`` on the servers.
        bus_on_channel_node: Publish and subscribe on the master owning the bus channel's
            slot, for clusters that do not propagate pub/sub between nodes (DragonflyDB's);
            None: decided by :meth:`connect`, True on DragonflyDB, False otherwise.

    Raises:
        ConfigurationError: No seed node, a malformed one, or an invalid TTL, size or prefix.
    """

    def __init__(
        self,
        *,
        nodes: Sequence[str],
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
        bus_on_channel_node: bool | None = None,
    ) -> None:
        seeds = tuple(parse_node(node) for node in nodes)
        if not seeds:
            msg = "an L2 cluster needs at least one seed node"
            raise ConfigurationError(msg)
        # Read by _make_client, which the base constructor calls.
        self._seeds = seeds
        self._pin_bus = bus_on_channel_node
        self._cluster_kwargs: dict[str, Any] = {
            "username": username,
            "password": password,
            "ssl": ssl,
            "ssl_ca_certs": None if ssl_ca_certs is None else str(ssl_ca_certs),
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            "client_name": client_name,
            "retry": _NO_RETRY,
            "protocol": 2,
        }
        super().__init__(
            host=seeds[0][0],
            port=seeds[0][1],
            db=0,  # a cluster has database 0 only
            username=username,
            password=password,
            ssl=ssl,
            ssl_ca_certs=ssl_ca_certs,
            key_prefix=key_prefix,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
            pool_timeout=pool_timeout,
            tick_ttl=tick_ttl,
            candle_ttl=candle_ttl,
            order_flow_ttl=order_flow_ttl,
            ring_size=ring_size,
            breaker=breaker,
            clock=clock,
            client_name=client_name,
        )
        #: ``redis cluster host:port,...`` (the seeds) for messages; never the password.
        self.target = "redis cluster " + ",".join(f"{h}:{p}" for h, p in seeds)
        # Bounds one slot-map refresh, which may try every known node in turn.
        self._refresh_timeout = (connect_timeout + socket_timeout) * max(3, len(seeds))

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
    ) -> ClusterRedisCache:
        """Build from ``settings.cluster_nodes`` (or ``host:port`` as the only seed when
        none are set) and the credentials, TLS, prefix, timeouts, pool size and
        ``bus_on_channel_node`` of :class:`~data_manager.settings.DragonflySettings`.

        Raises:
            ConfigurationError: A value is invalid or the password file is unreadable.
        """
        return cls(
            nodes=settings.cluster_nodes or (f"{settings.host}:{settings.port}",),
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
            bus_on_channel_node=settings.bus_on_channel_node,
        )

    def _make_client(self) -> Redis:
        # Called by the base constructor and after a fork: no I/O, no event loop yet.
        self._pools: dict[str, BlockingConnectionPool] = {}
        self._avoid: dict[str, float] = {}
        self._turn = itertools.count()
        self._mapped = False
        self._cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in self._seeds],
            # A master without replicas may be down: keep serving the slots of the others.
            require_full_coverage=False,
            **self._cluster_kwargs,
        )
        first = next(iter(self._cluster.nodes_manager.startup_nodes.values()))
        # The base class's client: kept for diagnostics; every call is overridden below.
        return Redis(connection_pool=self._pool(first.name))

    # ------------------------------------------------------------------ properties

    @property
    def cluster(self) -> RedisCluster:
        """The redis-py cluster client that holds the slot map (for diagnostics and tests)."""
        return self._cluster

    def node_for_symbol(self, symbol: str) -> str:
        """``host:port`` of the master that holds ``symbol``'s keys, per the current slot map.

        Raises:
            CacheError: The slot map is not loaded yet or does not cover the symbol's slot.
        """
        try:
            return self._route(self.tick_key(symbol))
        except RedisConnectionError as exc:
            raise CacheError(str(exc)) from exc

    # ------------------------------------------------------------------ topology

    def _pool(self, name: str) -> BlockingConnectionPool:
        pool = self._pools.get(name)
        if pool is None:
            host, port = parse_node(name)
            pool = BlockingConnectionPool(
                max_connections=self._max_connections,
                timeout=self._pool_timeout,
                **{**self._conn_kwargs, "host": host, "port": port},
            )
            self._pools[name] = pool
        return pool

    async def _refresh(self) -> None:
        """Reload the slot map from any reachable node (concurrent calls share one reload).

        Raises:
            redis.exceptions.ConnectionError: No node answered; callers map it to
                CacheUnavailableError.
        """
        try:
            async with asyncio.timeout(self._refresh_timeout):
                await self._cluster.nodes_manager.initialize()
        except (RedisClusterException, *_DRIVER_ERRORS, TimeoutError) as exc:
            msg = f"cannot load the slot map: {type(exc).__name__}: {exc}"
            raise RedisConnectionError(msg) from exc
        self._mapped = True

    def _route(self, key: str) -> str:
        """Name (``host:port``) of the master owning ``key``'s slot."""
        try:
            node = self._cluster.get_node_from_key(key)
        except RedisClusterException as exc:
            msg = f"no node serves the slot of {key!r}: {exc}"
            raise RedisConnectionError(msg) from exc
        if node is None:  # pragma: no cover - only asked for replicas
            msg = f"no node serves the slot of {key!r}"
            raise RedisConnectionError(msg)
        return node.name

    def node_states(self) -> dict[str, bool]:
        """Each known master and whether it is usable (False while avoided after a failure).

        No I/O: this is what the last slot-map refresh and the recent failures say.
        """
        now = time.monotonic()
        return {
            name: now - self._avoid.get(name, -_AVOID_SECONDS) >= _AVOID_SECONDS
            for name in self._masters()
        }

    def _masters(self) -> list[str]:
        nodes = self._cluster.nodes_manager.nodes_cache if self._mapped else {}
        names = [name for name, node in nodes.items() if node.server_type == "primary"]
        return names or list(self._cluster.nodes_manager.startup_nodes)

    def _any_node(self) -> str:
        """A master in turn, passing over those that failed within ``_AVOID_SECONDS``."""
        names = self._masters()
        now = time.monotonic()
        start = next(self._turn)
        for i in range(len(names)):
            name = names[(start + i) % len(names)]
            if now - self._avoid.get(name, -_AVOID_SECONDS) >= _AVOID_SECONDS:
                return name
        return names[start % len(names)]

    # ------------------------------------------------------------------ transport

    async def _send(
        self, name: str, commands: Sequence[tuple[str | bytes | int, ...]]
    ) -> list[Any]:
        """:meth:`RedisCache._pipeline` on the pool of node ``name``."""
        pool = self._pool(name)
        try:
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        except _CONNECTION_ERRORS:
            self._avoid[name] = time.monotonic()
            raise
        try:
            return await self._exchange(conn, commands)
        except BaseException as exc:
            await conn.disconnect(nowait=True)
            if isinstance(exc, _CONNECTION_ERRORS):
                self._avoid[name] = time.monotonic()
            raise
        finally:
            await pool.release(conn)

    async def _run(
        self, key: str | None, commands: Sequence[tuple[str | bytes | int, ...]]
    ) -> list[Any]:
        """Run ``commands`` on the node owning ``key`` (any master when None), following one
        redirection or connection error with a slot-map refresh and a single retry.

        Raises:
            redis.exceptions.ConnectionError: Still failing after the retry (callers map it to
                CacheUnavailableError, which the breaker counts).
        """
        if not self._mapped:
            await self._refresh()
        name = self._any_node() if key is None else self._route(key)
        try:
            replies = await self._send(name, commands)
        except _CONNECTION_ERRORS:
            await self._refresh()
            name = self._any_node() if key is None else self._route(key)
            return await self._send(name, commands)
        redirect = _first_redirect(replies)
        if redirect is None:
            return replies
        await self._refresh()
        if isinstance(redirect, AskError) and not isinstance(redirect, MovedError):
            # A slot in migration: this node imports it; ASKING admits the next command.
            asking = [c for command in commands for c in (_ASKING, command)]
            replies = (await self._send(f"{redirect.host}:{redirect.port}", asking))[1::2]
        else:
            replies = await self._send(name if key is None else self._route(key), commands)
        redirect = _first_redirect(replies)
        if redirect is not None:
            msg = f"still redirected after a slot-map refresh: {redirect}"
            raise RedisConnectionError(msg) from redirect
        return replies

    async def drop_keys(self, patterns: Sequence[str], *, slot_key: str) -> int:
        """:meth:`RedisCache.drop_keys` on the node serving ``slot_key``'s slot (the client
        of the base class talks to the first seed node only)."""
        keys: list[Any] = []
        for pattern in patterns:
            cursor: Any = 0
            while True:
                (reply,) = await self._run(
                    slot_key, [("SCAN", cursor, "MATCH", pattern, "COUNT", 500)]
                )
                if isinstance(reply, ResponseError):
                    raise reply
                cursor, found = reply
                keys.extend(found)
                if int(cursor) == 0:
                    break
        if keys:
            await self._command("UNLINK", *keys)  # on the node of the first key: the slot's
        return len(keys)

    async def _command(self, *args: str | bytes | int) -> Any:
        """One command on the node owning its key (``args[1]``)."""
        (reply,) = await self._run(str(args[1]), [args])
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def _pipeline(self, commands: Sequence[tuple[str | bytes | int, ...]]) -> list[Any]:
        """Commands on keys of one symbol (one slot), on the node owning it."""
        return await self._run(str(commands[0][1]), commands)

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        """Load the slot map, check every master answers and load the write script on each.

        Raises:
            CacheUnavailableError: No seed or a master is unreachable, too slow, or the
                breaker is open.
            CacheError: A server refused the script.
        """
        self._admit()
        try:
            await self._refresh()
            replies = await self._each_master(
                [("PING",), ("SCRIPT", "LOAD", WRITE_SCRIPT), ("INFO", "server")]
            )
            for ping, sha, info in replies:
                for reply in (ping, sha, info):
                    if isinstance(reply, Exception):
                        raise reply
                if self._pin_bus is None:
                    # DragonflyDB's nodes share no state, pub/sub included.
                    self._pin_bus = b"dragonfly_version" in info
                if sha.decode() != WRITE_SCRIPT_SHA:  # pragma: no cover - another hash
                    msg = f"L2 cache {self.target} returned script SHA {sha!r}"
                    raise CacheError(msg)
        except _DRIVER_ERRORS as exc:
            raise self._failure(exc) from exc
        self._ok()

    async def _each_master(
        self, commands: Sequence[tuple[str | bytes | int, ...]]
    ) -> list[list[Any]]:
        results = await asyncio.gather(
            *(self._send(name, commands) for name in self._masters()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    async def aclose(self) -> None:
        """Close every node's pool and the slot-map client. Later calls raise
        :class:`CacheUnavailableError`."""
        if self._closed:
            return
        self._closed = True
        with map_redis_errors(self.target):
            await asyncio.gather(*(pool.disconnect() for pool in self._pools.values()))
            # RedisCluster.aclose() closes nothing unless its own initialize() ran, which this
            # class never calls (it needs the slot map only): close the node clients directly.
            nodes = self._cluster.nodes_manager
            await nodes.aclose()
            await nodes.aclose("startup_nodes")

    def reset_after_fork(self) -> None:
        """Forget the parent's connections and slot-map client in a forked child."""
        self._abandoned.extend((self._cluster, *self._pools.values()))
        super().reset_after_fork()

    def new_connection(self) -> AbstractConnection:
        """A new, unconnected connection to one master, outside the pools.

        Masters are handed out in turn, passing over those that failed recently, so the cache
        bus resubscribes on another node when its node is lost (pub/sub messages reach every
        node of a Redis Cluster). With ``bus_on_channel_node``, always the master owning the
        channel's slot.
        """
        pool = self._pool(self._bus_node())
        return pool.connection_class(**pool.connection_kwargs)

    def _bus_node(self) -> str:
        """Where the bus subscribes (and, when pinned, publishes)."""
        if self._pin_bus and self._mapped:
            try:
                return self._route(self._channel)
            except RedisConnectionError:
                pass  # no owner known: any node is as good a guess
        return self._any_node()

    # ------------------------------------------------------------------ reads

    async def ping(self) -> float:
        """PING every master at once.

        Returns:
            The latency of the slowest, in milliseconds.

        Raises:
            CacheUnavailableError: A master is unreachable, too slow, or the breaker is open.
        """
        self._admit()
        start = time.perf_counter()
        try:
            if not self._mapped:
                await self._refresh()
            for (reply,) in await self._each_master([("PING",)]):
                if isinstance(reply, Exception):
                    raise reply
        except _DRIVER_ERRORS as exc:
            raise self._failure(exc) from exc
        elapsed = (time.perf_counter() - start) * 1000.0
        self._ok()
        return elapsed

    async def info_version(self) -> str:
        """The product and version of one master, e.g. ``"redis 7.0.15"``.

        Raises:
            CacheUnavailableError: Unreachable, too slow, or the breaker is open.
        """
        self._admit()
        try:
            (raw,) = await self._run(None, [("INFO", "server")])
            if isinstance(raw, Exception):
                raise raw
        except _DRIVER_ERRORS as exc:
            raise self._failure(exc) from exc
        self._ok()
        fields = dict(
            line.split(":", 1) for line in raw.decode(errors="replace").splitlines() if ":" in line
        )
        for product in ("dragonfly", "valkey"):
            version = fields.get(f"{product}_version")
            if version:
                return f"{product} {version}"
        return f"redis {fields.get('redis_version', 'unknown')}"

    async def get_ticks(self, symbols: Sequence[str]) -> dict[str, TickData]:
        """The latest tick (any source) of each symbol: one pipeline of GETs per node, the
        nodes queried concurrently (a cluster refuses a cross-slot MGET).

        Raises:
            CacheUnavailableError: A node is unreachable, too slow, or the breaker is open.
            CacheError: A server refused the call or a stored value is malformed.
        """
        if not symbols:
            return {}
        keys = [self.tick_key(s) for s in symbols]
        self._admit()
        raws: list[Any] = [None] * len(keys)
        try:
            if not self._mapped:
                await self._refresh()
            groups: dict[str, list[int]] = {}
            for i, key in enumerate(keys):
                groups.setdefault(self._route(key), []).append(i)
            results = await asyncio.gather(
                *(self._run(keys[ix[0]], [("GET", keys[i]) for i in ix]) for ix in groups.values()),
                return_exceptions=True,
            )
            for ix, result in zip(groups.values(), results, strict=True):
                if isinstance(result, BaseException):
                    raise result
                for i, raw in zip(ix, result, strict=True):
                    if isinstance(raw, ResponseError):
                        raise raw
                    raws[i] = raw
        except _DRIVER_ERRORS as exc:
            raise self._failure(exc) from exc
        self._ok()
        return self._decode_ticks(symbols, raws)

    def _decode_ticks(self, symbols: Sequence[str], raws: Sequence[Any]) -> dict[str, TickData]:
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

    # ------------------------------------------------------------------ writes

    async def apply(
        self,
        ops: Sequence[WriteOp],
        *,
        publish: tuple[str, bytes] | None = None,
        own_connection: bool = False,
    ) -> None:
        """Run write-script calls, grouped by owning node, then optionally one PUBLISH.

        The per-node pipelines run concurrently; with ``publish``, the pipeline of one node
        carries the PUBLISH at its end and is sent only after every other node's writes
        succeeded, so a subscriber that reads L2 after the message sees the values it
        announces. A batch on one node costs one round trip, as on a single server.
        ``own_connection`` is accepted and ignored: a batch may need several nodes, and
        each node's pool serves it.

        Raises:
            CacheUnavailableError: A node is unreachable, too slow, or the breaker is open.
            CacheError: A server refused a call.
        """
        self._admit()
        try:
            if not self._mapped:
                await self._refresh()
            groups: dict[str, list[WriteOp]] = {}
            for op in ops:
                groups.setdefault(self._route(str(op.args[1])), []).append(op)
            last: list[WriteOp] | None = None
            if publish is not None and groups:
                # The PUBLISH rides on the pipeline of one node's writes: any node's, or when
                # pinned the channel node's (if the batch has none, it goes there alone).
                last = groups.pop(self._bus_node(), None) if self._pin_bus else groups.popitem()[1]
            batches = list(groups.values())
            if batches:
                results = await asyncio.gather(
                    *(self._apply_on(batch, None) for batch in batches), return_exceptions=True
                )
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
            if publish is not None:
                await self._apply_on(last or [], publish)
        except _DRIVER_ERRORS as exc:
            raise self._write_failure(exc) from exc
        self._counters.writes += len(ops)
        self._ok()

    async def _apply_on(self, ops: Sequence[WriteOp], publish: tuple[str, bytes] | None) -> None:
        """Script calls on one node's keys (plus the PUBLISH), with the NOSCRIPT fallback."""
        key = str(ops[0].args[1]) if ops else self._channel if self._pin_bus else None
        # One call per item: a call's keys must share a hash slot.
        await _run_script_calls(functools.partial(self._run, key), [op.args for op in ops], publish)
