"""The backup stream against real NATS JetStream and Redis servers, replayed into PostgreSQL.

Every round trip ends with the same check: the rows in the database are exactly the items
published, each once, and a second replay changes nothing. Outages are real: dedicated
servers are stopped and started (``nats_server_factory`` / ``redis_server_factory``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

import data_manager.stream as stream_module
from data_manager.breaker import CircuitBreaker
from data_manager.cache import codec
from data_manager.clock import ManualClock
from data_manager.errors import (
    ConfigurationError,
    JournalError,
    JournalLockedError,
    ValidationError,
)
from data_manager.ingest import IngestPipeline
from data_manager.journal import Journal
from data_manager.models import CandleData, OrderFlowMetrics, TickData
from data_manager.router import DataRouter
from data_manager.settings import DataManagerSettings, PostgresSettings
from data_manager.stream import (
    SPOOL_DIR,
    BackupStreamError,
    NatsBackupStream,
    RedisBackupStream,
    backup_stream_from_url,
    decode_batch_message,
    encode_batch_message,
    parse_since,
    replay_from_stream,
)
from tests.integration.test_router_foundation import pg_settings, plain_strategy

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence
    from pathlib import Path

    from data_manager.journal import IngestItem
    from data_manager.storage.postgres import PostgresStorage
    from data_manager.stream import BackupStream, BackupStreamStats, StreamKind
    from tests.servers import RedisServer
    from tests.servers_nats import NatsServer

T0: Final = 1_727_996_400_000
DEADLINE: Final = 60.0
SOURCE: Final = "backup"


# --------------------------------------------------------------------------- data


def ticks(start: int, count: int, *, symbol: str = "EUR/USD") -> list[TickData]:
    return [
        TickData(
            symbol=symbol,
            timestamp=T0 + seq // 3,  # three quotes per millisecond: content keeps them apart
            bid=1.1 + (seq % 7) * 1e-5,
            ask=1.1002 + (seq % 7) * 1e-5,
            source=SOURCE,
            seq=seq,
            bid_size=1.0 + seq % 5,
            aggressor="buy" if seq % 2 else None,
        )
        for seq in range(start, start + count)
    ]


def candle(minute: int, close: float, *, closed: bool) -> CandleData:
    return CandleData(
        symbol="EUR/USD",
        timeframe="1m",
        timestamp=T0 + minute * 60_000,
        open=1.1,
        high=max(1.1, close),
        low=min(1.1, close),
        close=close,
        source=SOURCE,
        volume=10.0,
        is_closed=closed,
    )


def flow(window: int) -> OrderFlowMetrics:
    return OrderFlowMetrics(
        symbol="EUR/USD",
        timestamp=T0 + window * 1000,
        window_ms=1000,
        ofi=0.5,
        volume_delta=1.0 + window,
        buy_volume=2.0,
        sell_volume=1.0,
        imbalance=0.3,
        num_trades=3,
        source=SOURCE,
    )


# --------------------------------------------------------------------------- storage


async def open_storage(url: str, schema: str) -> PostgresStorage:
    from data_manager.storage.postgres import PostgresStorage

    storage = PostgresStorage(PostgresSettings(url=url, db_schema=schema))
    await storage.connect()
    await storage.create_schema()
    return storage


@pytest.fixture
async def storage(postgres_url: str, pg_schema: str) -> AsyncIterator[PostgresStorage]:
    store = await open_storage(postgres_url, pg_schema)
    try:
        yield store
    finally:
        await store.close()


async def fetch(url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return list(await conn.fetch(sql, timeout=10))
    finally:
        await conn.close(timeout=10)


async def tick_rows(url: str, schema: str) -> list[tuple[Any, ...]]:
    """Every stored tick (duplicates included), as comparable tuples."""
    rows = await fetch(
        url,
        f"SELECT symbol, source, (extract(epoch from ts) * 1000)::bigint AS ms, bid, ask, "
        f'seq, bid_size, aggressor FROM "{schema}".ticks',
    )
    return sorted(tuple(r) for r in rows)


def expected_ticks(items: Sequence[TickData]) -> list[tuple[Any, ...]]:
    return sorted(
        (t.symbol, t.source, t.timestamp, t.bid, t.ask, t.seq, t.bid_size, t.aggressor)
        for t in items
    )


async def count(url: str, schema: str, table: str) -> int:
    rows = await fetch(url, f'SELECT count(*) AS n FROM "{schema}".{table}')
    return int(rows[0]["n"])


async def until(condition: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    """Poll with a deadline (fault tests: the change comes from another process)."""
    stop = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > stop:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def dead_nats_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"nats://127.0.0.1:{port}"


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    """One stream destination: how to publish to it and how to replay from it."""

    backend: str
    url: str
    names: dict[str, Any]

    def make(self, **options: Any) -> BackupStream:
        fast: dict[str, Any] = {
            "breaker": CircuitBreaker("backup", failure_threshold=1, reset_timeout=0.1),
            "retry_interval": 0.01,
            "connect_timeout": 0.5,
        }
        fast.update(options)
        if self.backend == "nats":
            return NatsBackupStream(self.url, publish_timeout=0.5, **self.names, **fast)
        return RedisBackupStream(self.url, socket_timeout=0.5, **self.names, **fast)

    def replay_options(self) -> dict[str, Any]:
        return dict(self.names)


def nats_names() -> dict[str, Any]:
    tag = secrets.token_hex(4)
    return {"stream": f"DMTEST_{tag}", "subject_prefix": f"dmtest.{tag}"}


async def delete_nats_stream(url: str, stream: str) -> None:
    """Remove the stream this test created (only that one)."""
    import nats
    import nats.js.errors

    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        await nc.jetstream().delete_stream(stream)
    except nats.js.errors.NotFoundError:
        pass
    finally:
        await nc.close()


async def delete_redis_key(url: str, key: str) -> None:
    client = Redis.from_url(url, socket_timeout=10)
    try:
        await client.unlink(key)
    finally:
        await client.aclose()


@pytest.fixture
async def redis_key(redis_url: str) -> AsyncIterator[str]:
    """A fresh Redis stream key, removed afterwards."""
    key = f"t{secrets.token_hex(4)}:backup"
    yield key
    await delete_redis_key(redis_url, key)


@pytest.fixture(params=["nats", pytest.param("redis", marks=pytest.mark.redis)])
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    """A fresh destination on the session's server: its own JetStream stream or Redis key.

    Only the (synchronous) URL fixtures are looked up here, so a Redis run needs no NATS
    server and the other way round; the stream or key is removed afterwards.
    """
    if request.param == "nats":
        url: str = request.getfixturevalue("nats_url")
        names = nats_names()
        yield Target("nats", url, names)
        await delete_nats_stream(url, names["stream"])
    else:
        url = request.getfixturevalue("redis_url")
        key = f"t{secrets.token_hex(4)}:backup"
        yield Target("redis", url, {"key": key})
        await delete_redis_key(url, key)


def mixed_batches() -> list[list[IngestItem]]:
    """Ticks in batches of 500, plus candle versions and order flow along the way."""
    batches: list[list[IngestItem]] = [list(ticks(start, 500)) for start in range(0, 3000, 500)]
    # A forming candle rewritten, then closed; a later forming version must not win.
    batches[1] += [candle(0, 1.1001, closed=False), flow(1)]
    batches[2] += [candle(0, 1.1003, closed=False), candle(1, 1.1002, closed=False)]
    batches[3] += [candle(0, 1.1004, closed=True), flow(2)]
    batches[4] += [candle(0, 1.0999, closed=False), candle(1, 1.1005, closed=True)]
    return batches


async def candle_rows(url: str, schema: str) -> list[tuple[Any, ...]]:
    rows = await fetch(url, f'SELECT ts, close, is_closed FROM "{schema}".candles ORDER BY ts')
    return [(r["ts"].timestamp() * 1000, r["close"], r["is_closed"]) for r in rows]


# --------------------------------------------------------------------------- format


def test_message_items_are_the_codec_objects() -> None:
    samples: list[tuple[StreamKind, IngestItem]] = [
        *(("tick", t) for t in ticks(0, 3)),
        ("candle", candle(0, 1.1002, closed=True)),
        ("order_flow", flow(1)),
    ]
    for kind, item in samples:
        payload = encode_batch_message(kind, "origin:1", "origin", [item, item])
        one = codec.encode_item(item)
        assert b'"items":[' + one + b"," + one + b"]}" in payload
        message = decode_batch_message(payload)
        assert message.kind == kind
        assert message.batch_id == "origin:1"
        assert message.items == [item, item]
    with pytest.raises(ValidationError):
        encode_batch_message("candle", "origin:2", "origin", ticks(0, 1))


def test_decoding_refuses_what_it_cannot_trust() -> None:
    good = orjson.loads(encode_batch_message("tick", "o:1", "o", ticks(0, 2)))
    for broken in (
        {**good, "v": 2},
        {**good, "type": "bus"},
        {**good, "kind": "quote"},
        {**good, "items": [{**good["items"][0], "ask": 0.5}]},  # ask below bid
        {**good, "items": [{**good["items"][0], "type": "candle"}]},
    ):
        with pytest.raises(ValidationError):
            decode_batch_message(orjson.dumps(broken))
    with pytest.raises(ValidationError):
        decode_batch_message(b"{not json")
    # Members a later v1 writer may add are ignored.
    extra = {**good, "trace": "x", "items": [{**good["items"][0], "venue": "x"}]}
    assert decode_batch_message(orjson.dumps(extra)).items == ticks(0, 1)


def test_parse_since() -> None:
    assert parse_since("1727996400000") == T0
    assert parse_since("2024-10-03T23:00:00Z") == T0
    assert parse_since("2024-10-04T01:00:00+02:00") == T0
    assert parse_since("2024-10-03T23:00:00") == T0  # no offset: UTC
    with pytest.raises(ValidationError):
        parse_since("1727996400")  # seconds
    with pytest.raises(ValidationError):
        parse_since("yesterday")


def test_backup_stream_from_url_picks_the_backend_and_hides_secrets() -> None:
    nats_stream = backup_stream_from_url("nats://user:s3cret@127.0.0.1:4222", stream="S")
    redis_stream = backup_stream_from_url("redis://:s3cret@127.0.0.1:6379/0", key="k")
    assert isinstance(nats_stream, NatsBackupStream)
    assert isinstance(redis_stream, RedisBackupStream)
    for stream in (nats_stream, redis_stream):
        assert "s3cret" not in stream.target
        assert "s3cret" not in repr(stream)
        assert "s3cret" not in str(stream.stats())
    with pytest.raises(ConfigurationError):
        backup_stream_from_url("kafka://127.0.0.1:9092")
    with pytest.raises(ConfigurationError):
        NatsBackupStream("nats://127.0.0.1:4222", stream="has.dot")


# --------------------------------------------------------------------------- round trips


async def test_replay_rebuilds_the_database_twice_without_duplicates(
    target: Target, storage: PostgresStorage, postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    batches = mixed_batches()
    # A small message limit splits each batch of 500 ticks into several messages.
    stream = target.make(spool_dir=tmp_path, max_message_bytes=64 * 1024, coalesce_items=1)
    await stream.start()
    for batch in batches:
        stream.publish_batch(batch)
    await stream.flush(timeout=30)
    stats = stream.stats()
    await stream.aclose()
    items = [item for batch in batches for item in batch]
    assert stats.state == "up"
    assert stats.published_items == len(items)
    assert stats.published_messages > len(batches)  # split by size
    assert stats.pending_items == 0
    assert stats.failures == 0

    first = await replay_from_stream(storage, target.url, **target.replay_options())
    all_ticks = [i for i in items if type(i) is TickData]
    assert first.ticks == len(all_ticks) == 3000
    assert first.invalid_messages == 0
    assert await tick_rows(postgres_url, pg_schema) == expected_ticks(all_ticks)
    # The last versions win, and the forming candle(0) published after the closed one
    # does not replace it.
    assert await candle_rows(postgres_url, pg_schema) == [
        (T0, 1.1004, True),
        (T0 + 60_000, 1.1005, True),
    ]
    assert await count(postgres_url, pg_schema, "order_flow") == 2

    second = await replay_from_stream(storage, target.url, **target.replay_options())
    assert second.ticks == first.ticks
    assert await count(postgres_url, pg_schema, "ticks") == 3000
    assert await tick_rows(postgres_url, pg_schema) == expected_ticks(all_ticks)
    assert await count(postgres_url, pg_schema, "candles") == 2
    assert await count(postgres_url, pg_schema, "order_flow") == 2


async def test_replay_since_selects_by_stream_time_and_kind(
    target: Target, storage: PostgresStorage, postgres_url: str, pg_schema: str
) -> None:
    stream = target.make()
    await stream.start()
    stream.publish_batch(ticks(0, 100))
    await stream.flush(timeout=30)
    cut = time.time_ns() // 1_000_000
    # The server's clock must pass the cut before the second batch is stored.
    await until(lambda: time.time_ns() // 1_000_000 > cut + 1, "the clock to move on")
    later = ticks(100, 100)
    stream.publish_batch([*later, candle(5, 1.1001, closed=True)])
    await stream.flush(timeout=30)
    await stream.aclose()

    report = await replay_from_stream(
        storage, target.url, since_ms=cut + 1, kind="tick", **target.replay_options()
    )
    assert report.ticks == 100
    assert report.candles == 0
    assert report.first_ms is not None
    assert report.first_ms > cut
    assert await tick_rows(postgres_url, pg_schema) == expected_ticks(later)
    assert await count(postgres_url, pg_schema, "candles") == 0


async def test_an_empty_or_missing_stream_replays_nothing(
    target: Target, storage: PostgresStorage
) -> None:
    if target.backend == "nats":
        with pytest.raises(BackupStreamError, match="does not exist"):
            await replay_from_stream(storage, target.url, **target.replay_options())
    else:
        report = await replay_from_stream(storage, target.url, **target.replay_options())
        assert report.messages == report.items == 0


async def test_spool_of_a_closed_instance_is_adopted_and_published(
    target: Target, storage: PostgresStorage, postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    spool_root = tmp_path / "stream-spool"
    options: dict[str, Any] = {"spool_dir": spool_root, "connect_timeout": 0.2}
    down: BackupStream = (
        NatsBackupStream(dead_nats_url(), **target.names, **options)
        if target.backend == "nats"
        else RedisBackupStream("redis://127.0.0.1:1/0", **target.names, **options)
    )
    await down.start()
    batches = [ticks(start, 200) for start in range(0, 1000, 200)]
    for batch in batches:
        down.publish_batch(batch)
    await until(lambda: down.stats().spool_records == 1000, "the batches to be spooled")
    stats = down.stats()
    assert stats.state == "down"
    assert stats.failures >= 1
    assert stats.last_error
    assert stats.pending_items == 1000
    await down.aclose(timeout=0.2)  # down: what is left stays in the spool, on disk
    assert [p.name for p in spool_root.iterdir()]  # the closed instance's folder

    up = target.make(spool_dir=spool_root)
    await up.start()
    assert up.stats().adopted_spools == 1
    await up.flush(timeout=30)
    stats = up.stats()
    await up.aclose()
    assert stats.published_items == 1000
    assert stats.spool_records == 0
    assert not list(spool_root.iterdir())  # both spools are gone once published

    await replay_from_stream(storage, target.url, **target.replay_options())
    assert await tick_rows(postgres_url, pg_schema) == expected_ticks(
        [t for batch in batches for t in batch]
    )


@pytest.fixture
async def nats_target(nats_url: str) -> AsyncIterator[Target]:
    names = nats_names()
    yield Target("nats", nats_url, names)
    await delete_nats_stream(nats_url, names["stream"])


class _AckLostOnce(NatsBackupStream):
    """The server stores the first spooled message but its acknowledgement never comes back
    (a publish timeout, the client delivering it anyway); more batches are spooled meanwhile."""

    lost = False

    async def _send(self, message: Any) -> bool:
        stored = await super()._send(message)
        if not self.lost and ":s" in message.batch_id:
            self.lost = True
            self.publish_batch(ticks(3, 5))  # in backlog: to the spool, behind the chunk
            spool = self._spool
            assert spool is not None
            await until(lambda: spool.last_lsn >= 8, "the new batch to be spooled")
            msg = "publish timed out (acknowledgement lost)"
            raise BackupStreamError(msg)
        return stored


async def drain_after_an_outage(
    cls: type[NatsBackupStream],
    target: Target,
    root: Path,
    batch: Sequence[IngestItem],
    **options: Any,
) -> NatsBackupStream:
    """Spool ``batch`` while the stream is down, then drain the spool with a ``cls``
    stream of the same instance (closed once it has flushed)."""
    down = NatsBackupStream(
        dead_nats_url(), spool_dir=root, instance_id="inst-d", connect_timeout=0.2, **target.names
    )
    await down.start()
    down.publish_batch(batch)
    await until(lambda: down.stats().spool_records == len(batch), "the batch to be spooled")
    await down.aclose(timeout=0.2)
    up = cls(
        target.url,
        spool_dir=root,
        instance_id="inst-d",
        breaker=CircuitBreaker("backup", failure_threshold=1, reset_timeout=0.05),
        retry_interval=0.01,
        **target.names,
        **options,
    )
    await up.start()
    await up.flush(timeout=30)
    await up.aclose()
    return up


async def test_a_spool_chunk_sent_again_after_a_lost_ack_is_not_taken_for_a_duplicate(
    nats_target: Target, storage: PostgresStorage, postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    up = await drain_after_an_outage(
        _AckLostOnce, nats_target, tmp_path / "stream-spool", ticks(0, 3)
    )
    assert isinstance(up, _AckLostOnce)
    assert up.lost
    await replay_from_stream(storage, nats_target.url, **nats_target.replay_options())
    assert await tick_rows(postgres_url, pg_schema) == expected_ticks(ticks(0, 8))


async def test_a_pump_cancelled_while_connecting_leaves_no_connection_open(tmp_path: Path) -> None:
    # A server that accepts the connection and never greets: the client waits in connect.
    accepted = asyncio.Event()
    client_gone = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        accepted.set()
        await reader.read()  # b"" once the client has closed its end
        client_gone.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        stream = NatsBackupStream(
            f"nats://127.0.0.1:{port}", connect_timeout=10, spool_dir=tmp_path, **nats_names()
        )
        await stream.start()
        stream.publish_batch(ticks(0, 1))
        await asyncio.wait_for(accepted.wait(), DEADLINE)
        await stream.aclose(timeout=0)  # cancels the pump inside the connect
        try:
            await asyncio.wait_for(client_gone.wait(), 5)
        except TimeoutError:
            pytest.fail("the half-built NATS client kept its connection open")
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


class _SecondMessageFailsOnce(NatsBackupStream):
    """The first attempt to drain the spool fails at its second message; with ``ack_lost``
    it fails at the first, after the server stored it (the acknowledgement never came)."""

    def __init__(self, *args: Any, ack_lost: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ack_lost = ack_lost
        self.sends = 0

    async def _send(self, message: Any) -> bool:
        self.sends += 1
        if self.ack_lost and self.sends == 1:
            await super()._send(message)
            msg = "publish timed out (acknowledgement lost)"
            raise BackupStreamError(msg)
        if not self.ack_lost and self.sends == 2:
            msg = "publish failed"
            raise BackupStreamError(msg)
        return await super()._send(message)


async def drain_failing_once(
    target: Target, root: Path, batch: Sequence[IngestItem], *, ack_lost: bool, **options: Any
) -> BackupStreamStats:
    """Spool ``batch`` while the stream is down, then drain it with one failed send."""
    up = await drain_after_an_outage(
        _SecondMessageFailsOnce, target, root, batch, ack_lost=ack_lost, **options
    )
    return up.stats()


@pytest.mark.parametrize("ack_lost", [False, True], ids=["second-fails", "first-ack-lost"])
async def test_a_spool_chunk_cut_differently_when_sent_again_loses_nothing(
    nats_target: Target,
    storage: PostgresStorage,
    postgres_url: str,
    pg_schema: str,
    tmp_path: Path,
    ack_lost: bool,
) -> None:
    # About 13 KB: several 4 KiB messages, cut anew on the second attempt (the encoder's
    # size estimate has changed), so a message id must name what the message holds.
    batch = ticks(0, 40)
    stats = await drain_failing_once(
        nats_target, tmp_path / "stream-spool", batch, ack_lost=ack_lost, max_message_bytes=4096
    )
    assert stats.dropped_items == 0
    await replay_from_stream(storage, nats_target.url, **nats_target.replay_options())
    assert await tick_rows(postgres_url, pg_schema) == expected_ticks(batch)


@pytest.mark.parametrize("ack_lost", [False, True], ids=["second-fails", "first-ack-lost"])
async def test_a_copy_jetstream_drops_as_a_duplicate_is_not_published_twice(
    nats_target: Target, storage: PostgresStorage, tmp_path: Path, ack_lost: bool
) -> None:
    # One message per kind, cut the same way on every attempt: the tick message goes out
    # twice under the same id, and JetStream keeps one copy.
    batch: list[IngestItem] = [*ticks(0, 20), candle(0, 1.1001, closed=True), flow(1)]
    stats = await drain_failing_once(
        nats_target, tmp_path / "stream-spool", batch, ack_lost=ack_lost
    )
    report = await replay_from_stream(storage, nats_target.url, **nats_target.replay_options())
    assert stats.duplicates == 1
    assert report.messages == 3
    assert report.items == len(batch)
    # What the stream holds, each message once: a copy it dropped is not counted again,
    # and one whose first acknowledgement was lost is counted at its second.
    assert stats.published_messages == report.messages
    assert stats.published_items == report.items


# --------------------------------------------------------------------------- JetStream limits


async def set_nats_stream(target: Target, **config: Any) -> None:
    """Create the test's JetStream stream with ``config``, or change an existing one."""
    import nats
    import nats.js.errors
    from nats.js import api

    nc = await nats.connect(target.url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        name = target.names["stream"]
        try:
            current = (await js.stream_info(name)).config
        except nats.js.errors.NotFoundError:
            subjects = [f"{target.names['subject_prefix']}.>"]
            await js.add_stream(api.StreamConfig(name=name, subjects=subjects, **config))
        else:
            for field, value in config.items():
                setattr(current, field, value)
            await js.update_stream(current)
    finally:
        await nc.close()


async def test_an_existing_streams_max_msg_size_caps_the_messages(
    nats_target: Target, storage: PostgresStorage, postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    # The operator's stream takes messages of 16 KiB at most; a batch of 1000 ticks encodes
    # to about 330 KB, well under the SDK's own 1 MiB limit.
    await set_nats_stream(nats_target, max_msg_size=16 * 1024)
    stream = nats_target.make(spool_dir=tmp_path)
    await stream.start()
    batch = ticks(0, 1000)
    stream.publish_batch(batch)
    await stream.flush(timeout=10)
    stats = stream.stats()
    await stream.aclose()
    assert stats.state == "up"
    assert stats.published_items == 1000
    assert stats.published_messages >= 20  # cut to fit
    assert stats.failures == stats.dropped_items == 0
    await replay_from_stream(storage, nats_target.url, **nats_target.replay_options())
    assert await tick_rows(postgres_url, pg_schema) == expected_ticks(batch)


async def test_a_message_the_stream_refuses_as_too_large_is_cut_smaller(
    nats_target: Target, storage: PostgresStorage, postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    stream = nats_target.make(spool_dir=tmp_path)
    await stream.start()
    before = ticks(0, 1000)
    stream.publish_batch(before)
    await stream.flush(timeout=10)
    assert stream.stats().published_messages == 1
    # The operator lowers the limit while the router runs: the server now refuses what the
    # stream object was told it could send.
    await set_nats_stream(nats_target, max_msg_size=16 * 1024)
    after = ticks(1000, 1000)
    stream.publish_batch(after)
    await stream.flush(timeout=10)
    stats = stream.stats()
    await stream.aclose()
    assert stats.state == "up"
    assert stats.published_items == 2000
    assert stats.published_messages >= 21
    assert stats.dropped_items == 0
    await replay_from_stream(storage, nats_target.url, **nats_target.replay_options())
    assert await tick_rows(postgres_url, pg_schema) == expected_ticks(before + after)


@pytest.mark.parametrize("limit_known", [True, False], ids=["known", "lowered-later"])
async def test_a_record_larger_than_the_stream_allows_is_dropped_not_retried(
    nats_target: Target,
    storage: PostgresStorage,
    postgres_url: str,
    pg_schema: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    limit_known: bool,
) -> None:
    # About 330 bytes per ordinary tick: a few fit in a 1.5 KiB message; a tick carrying a
    # 1024-character use_case never does.
    limit = 1536
    if limit_known:
        await set_nats_stream(nats_target, max_msg_size=limit)
    stream = nats_target.make(spool_dir=tmp_path)
    await stream.start()
    if not limit_known:
        stream.publish_batch(ticks(0, 1))  # the stream is created with no size limit
        await stream.flush(timeout=10)
        await set_nats_stream(nats_target, max_msg_size=limit)
    small = ticks(1, 30)
    huge = ticks(31, 1)[0].model_copy(update={"use_case": "u" * 1024})
    stream.publish_batch([*small[:15], huge, *small[15:]])
    await stream.flush(timeout=10)
    later = ticks(100, 10)
    stream.publish_batch(later)  # the stream is not wedged behind the refused record
    await stream.flush(timeout=10)
    stats = stream.stats()
    await stream.aclose()
    assert stats.state == "up"
    assert stats.dropped_items == 1
    assert stats.published_items == stats.accepted_items - 1
    assert any(r.levelname == "ERROR" and "not published" in r.getMessage() for r in caplog.records)
    await replay_from_stream(storage, nats_target.url, **nats_target.replay_options())
    published = [*(ticks(0, 1) if not limit_known else []), *small, *later]
    assert await tick_rows(postgres_url, pg_schema) == expected_ticks(published)


async def nats_streams(url: str) -> Any:
    """A JetStream context on a fresh connection (the caller closes ``.nc``)."""
    import nats

    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    js = nc.jetstream()
    js.nc = nc  # type: ignore[attr-defined]
    return js


def config_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "configuration change" in r.getMessage()]


@pytest.mark.parametrize(
    "case", ["subjects-elsewhere", "subjects-taken", "missing", "expected-stream"]
)
async def test_a_jetstream_configuration_error_is_logged_as_an_error_and_retried(
    nats_target: Target, tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    from nats.js import api

    name, prefix = nats_target.names["stream"], nats_target.names["subject_prefix"]
    other = f"{name}_OTHER"
    js = await nats_streams(nats_target.url)
    stream = nats_target.make(spool_dir=tmp_path, create_stream=case != "missing")
    try:
        await stream.start()
        if case == "subjects-elsewhere":  # the operator's stream does not take our subjects
            await js.add_stream(api.StreamConfig(name=name, subjects=[f"{prefix}x.>"]))
        elif case == "subjects-taken":  # another stream takes them: ours cannot be created
            await js.add_stream(api.StreamConfig(name=other, subjects=[f"{prefix}.>"]))
        elif case == "expected-stream":  # changed while the router runs: 10060 on publish
            stream.publish_batch(ticks(0, 10))
            await stream.flush(timeout=10)
            await js.update_stream(api.StreamConfig(name=name, subjects=[f"{prefix}x.>"]))
            await js.add_stream(api.StreamConfig(name=other, subjects=[f"{prefix}.>"]))
        stream.publish_batch(ticks(10, 10))
        failures = stream.stats().failures
        await until(lambda: stream.stats().failures >= failures + 3, "three failed attempts")
        stats = stream.stats()
        assert stats.state == "down"
        assert stats.last_error is not None
        assert stats.last_error.startswith("configuration error:")
        # Said at ERROR, not at every retry (the refused publish, then, for 10060, what the
        # stream's configuration shows when it is looked up again), never as an outage.
        [first, *_] = errors = config_errors(caplog)
        assert len(errors) == (2 if case == "expected-stream" else 1)
        assert all(e.levelname == "ERROR" for e in errors)
        assert name in first.getMessage()
        if case == "expected-stream":
            assert "10060" in first.getMessage()
        assert not any("is down" in r.getMessage() for r in caplog.records)

        # The operator fixes the configuration: the stream publishes again by itself.
        if case != "missing":
            with contextlib.suppress(Exception):
                await js.delete_stream(other)
        if case in ("subjects-elsewhere", "expected-stream"):
            await js.update_stream(api.StreamConfig(name=name, subjects=[f"{prefix}.>"]))
        if case == "missing":
            await js.add_stream(api.StreamConfig(name=name, subjects=[f"{prefix}.>"]))
        await stream.flush(timeout=30)
        stats = stream.stats()
        await stream.aclose()
        assert stats.state == "up"
        assert stats.dropped_items == 0
        assert stats.published_items == (20 if case == "expected-stream" else 10)
    finally:
        await stream.aclose()
        with contextlib.suppress(Exception):
            await js.delete_stream(other)
        await js.nc.close()


async def test_jetstream_account_limits_are_an_outage_not_a_configuration_error(
    nats_target: Target,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Error 10002 comes with status 400 but passes by itself once messages age out of the
    # account's streams. The server answers for real; the refusal is injected in front of it
    # (provoking it needs a clustered server with account limits).
    from nats.js.client import JetStreamContext
    from nats.js.errors import BadRequestError

    real_publish = JetStreamContext.publish
    refusals = 3

    async def publish(self: JetStreamContext, *args: Any, **kwargs: Any) -> Any:
        nonlocal refusals
        if refusals:
            refusals -= 1
            raise BadRequestError(
                code=400, err_code=10002, description="resource limits exceeded for account"
            )
        return await real_publish(self, *args, **kwargs)

    monkeypatch.setattr(JetStreamContext, "publish", publish)
    stream = nats_target.make(spool_dir=tmp_path)
    await stream.start()
    try:
        stream.publish_batch(ticks(0, 10))
        await until(lambda: stream.stats().failures >= 1, "a refused publish")
        last_error = stream.stats().last_error
        assert last_error is not None
        assert "10002" in last_error
        assert not last_error.startswith("configuration error")
        await stream.flush(timeout=30)
        stats = stream.stats()
        assert (stats.state, stats.published_items, stats.dropped_items) == ("up", 10, 0)
        assert not config_errors(caplog)
        assert any(r.levelname == "WARNING" and "is down" in r.getMessage() for r in caplog.records)
    finally:
        await stream.aclose()


@pytest.mark.redis
async def test_a_refused_xadd_shows_the_servers_message(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    server, target = dedicated_target("redis", request)
    admin = Redis.from_url(server.url)
    stream = target.make(spool_dir=tmp_path)
    await stream.start()
    try:
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", 1)  # every write is refused: OOM
        stream.publish_batch(ticks(0, 10))
        await until(lambda: stream.stats().failures >= 1, "a refused XADD")
        last_error = stream.stats().last_error
        assert last_error is not None
        assert "OutOfMemoryError: command not allowed" in last_error  # not a bare repr
        await admin.config_set("maxmemory", 0)
        await stream.flush(timeout=30)
        assert stream.stats().published_items == 10
    finally:
        await stream.aclose()
        await admin.aclose()


@pytest.mark.redis
async def test_a_redis_key_of_another_type_is_a_configuration_error(
    redis_url: str, redis_key: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = Redis.from_url(redis_url, socket_timeout=10)
    stream = Target("redis", redis_url, {"key": redis_key}).make(spool_dir=tmp_path)
    try:
        await client.set(redis_key, "not a stream")
        await stream.start()
        stream.publish_batch(ticks(0, 10))
        await until(lambda: stream.stats().failures >= 3, "three failed attempts")
        assert (stream.stats().last_error or "").startswith("configuration error:")
        [error] = config_errors(caplog)
        assert error.levelname == "ERROR"
        assert "WRONGTYPE" in error.getMessage()
        await client.unlink(redis_key)  # the operator removes the stray key
        await stream.flush(timeout=30)
        stats = stream.stats()
        await stream.aclose()
        assert stats.state == "up"
        assert stats.published_items == 10
    finally:
        await stream.aclose()
        await client.aclose()


async def test_without_a_spool_a_down_stream_keeps_a_bounded_outbox(target: Target) -> None:
    url = dead_nats_url() if target.backend == "nats" else "redis://127.0.0.1:1/0"
    stream = (
        NatsBackupStream(url, connect_timeout=0.2, max_pending_items=250, **target.names)
        if target.backend == "nats"
        else RedisBackupStream(url, connect_timeout=0.2, max_pending_items=250, **target.names)
    )
    await stream.start()
    for start in range(0, 1000, 100):
        stream.publish_batch(ticks(start, 100))
    stats = stream.stats()
    assert stats.accepted_items == 1000
    assert stats.pending_items <= 300  # the bound (plus the batch in flight)
    assert stats.dropped_items == 1000 - stats.pending_items
    await stream.aclose(timeout=0.1)
    stats = stream.stats()
    assert stats.state == "closed"
    assert stats.dropped_items == 1000  # counted, never silent
    stream.publish_batch(ticks(0, 10))  # after close: counted, not raised
    assert stream.stats().dropped_items == 1010


async def test_refused_items_are_logged_briefly_and_rate_limited(
    nats_target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    # Ticks holding a value that is not JSON (built without validation) and a bulky field:
    # each is refused, counted; the log says which item, in a line, and not once per item.
    bulky = "s" * 100_000

    def bad(seq: int) -> TickData:
        changes = {"use_case": object(), "source": bulky}
        return TickData.model_construct(**(ticks(seq, 1)[0].__dict__ | changes))

    clock = ManualClock()
    stream = nats_target.make(clock=clock)
    await stream.start()
    good = ticks(0, 50)
    stream.publish_batch([item for seq, tick in enumerate(good) for item in (tick, bad(seq))])
    await stream.flush(timeout=10)

    def refusals() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "not published" in r.getMessage()]

    assert stream.stats().dropped_items == 50
    assert stream.stats().published_items == 50
    [first] = refusals()
    assert first.levelname == "ERROR"
    message = first.getMessage()
    assert len(message) < 500
    assert f"TickData 'EUR/USD' at {T0}" in message
    clock.advance(3600)
    stream.publish_batch([bad(50)])
    await stream.flush(timeout=10)
    stats = stream.stats()
    await stream.aclose()
    assert stats.dropped_items == 51
    [_, second] = refusals()
    assert second.getMessage().endswith("[49 similar suppressed]")
    assert f"at {T0 + 50 // 3}" in second.getMessage()


# --------------------------------------------------------------------------- outages


def dedicated_target(
    backend: str, request: pytest.FixtureRequest
) -> tuple[NatsServer | RedisServer, Target]:
    """A server of ``backend`` of the test's own (it may stop and start it) and its target."""
    if backend == "nats":
        nats: NatsServer = request.getfixturevalue("nats_server_factory")()
        return nats, Target("nats", nats.url, nats_names())
    redis: RedisServer = request.getfixturevalue("redis_server_factory")()
    return redis, Target("redis", redis.url, {"key": f"t{secrets.token_hex(4)}:backup"})


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["nats", pytest.param("redis", marks=pytest.mark.redis)])
async def test_stream_outage_spools_without_blocking_then_catches_up(
    backend: str,
    request: pytest.FixtureRequest,
    storage: PostgresStorage,
    postgres_url: str,
    pg_schema: str,
    tmp_path: Path,
) -> None:
    server, target = dedicated_target(backend, request)
    # A small outbox: the publish that hangs while the server goes away overflows it.
    stream = target.make(spool_dir=tmp_path / "stream-spool", max_pending_items=1_000)
    await stream.start()
    before = ticks(0, 1000)
    stream.publish_batch(before)
    await stream.flush(timeout=30)

    server.stop()
    during = [ticks(start, 250) for start in range(1000, 6000, 250)]
    for batch in during:
        stream.publish_batch(batch)  # synchronous: it cannot wait for the server
        await asyncio.sleep(0)  # let the publisher and the spooler run between batches
    await until(lambda: stream.stats().state == "down", "the stream to be seen down")
    await until(lambda: stream.stats().spooled_items >= 5000, "the outage's batches to be spooled")
    stats = stream.stats()
    assert stats.failures >= 1
    assert stats.pending_items >= 5000
    assert stats.dropped_items == 0
    assert stats.lag_seconds > 0

    server.start()
    after = ticks(6000, 500)
    stream.publish_batch(after)
    await until(
        lambda: stream.stats().pending_items == 0 and stream.stats().state == "up",
        "the spool to be published",
    )
    stats = stream.stats()
    await stream.aclose()
    assert stats.published_items >= 6500
    assert stats.dropped_items == 0
    assert not list((tmp_path / "stream-spool").iterdir())

    report = await replay_from_stream(storage, target.url, **target.replay_options())
    assert report.invalid_messages == 0
    outage_and_after = [t for batch in during for t in batch] + after
    if backend == "nats":
        # JetStream's file store survived the restart: everything is there, once.
        assert await tick_rows(postgres_url, pg_schema) == expected_ticks(before + outage_and_after)
    else:
        # A Redis server without persistence forgets its stream when it restarts (the
        # documented limit): only what was published after the restart is there.
        assert await tick_rows(postgres_url, pg_schema) == expected_ticks(outage_and_after)
    if backend == "nats":
        await delete_nats_stream(server.url, target.names["stream"])


def unreadable_tick(seq: int) -> TickData:
    """A tick the spool takes but cannot read back: built without validation (bid < 0)."""
    return TickData.model_construct(**(ticks(seq, 1)[0].__dict__ | {"bid": -1.0}))


@pytest.mark.parametrize("backend", ["nats", pytest.param("redis", marks=pytest.mark.redis)])
async def test_an_unreadable_spool_record_is_counted_once_across_failed_drains(
    backend: str,
    request: pytest.FixtureRequest,
    storage: PostgresStorage,
    postgres_url: str,
    pg_schema: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, target = dedicated_target(backend, request)
    server.stop()  # the first attempts fail: the stream is really down
    stream = target.make(spool_dir=tmp_path / "stream-spool", connect_timeout=0.2)
    await stream.start()
    good = [*ticks(0, 5), *ticks(6, 5)]
    stream.publish_batch(good[:5])
    stream.publish_batch([unreadable_tick(5)])
    stream.publish_batch(good[5:])
    await until(lambda: stream.stats().spool_records == 11, "the batches to be spooled")
    # Every failed attempt to drain the spool has read (and decoded) the chunk again.
    failures = stream.stats().failures
    await until(lambda: stream.stats().failures >= failures + 3, "three failed drains")
    assert stream.stats().dropped_items == 1
    server.start()
    await stream.flush(timeout=30)
    stats = stream.stats()
    await stream.aclose()
    assert stats.dropped_items == 1
    assert stats.published_items == len(good)
    unreadable = [
        r for r in caplog.records if r.levelname == "ERROR" and "unreadable" in r.getMessage()
    ]
    assert len(unreadable) == 1
    # An outage is a transient error: a warning, not an error.
    assert any(r.levelname == "WARNING" and "is down" in r.getMessage() for r in caplog.records)
    report = await replay_from_stream(storage, target.url, **target.replay_options())
    assert report.items == len(good)  # each good record published once
    assert await tick_rows(postgres_url, pg_schema) == expected_ticks(good)
    if backend == "nats":
        await delete_nats_stream(server.url, target.names["stream"])


async def test_spooled_records_of_a_deleted_segment_are_counted_dropped_once(
    nats_server_factory: Any,
    storage: PostgresStorage,
    postgres_url: str,
    pg_schema: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import functools

    from data_manager import stream as stream_module
    from data_manager.journal import Journal

    monkeypatch.setattr(stream_module, "Journal", functools.partial(Journal, segment_bytes=1024))
    server = nats_server_factory()
    target = Target("nats", server.url, nats_names())
    server.stop()  # the drains fail until it is back
    stream = target.make(spool_dir=tmp_path / "stream-spool", connect_timeout=0.2)
    await stream.start()
    batches = [ticks(start, 5) for start in range(0, 60, 5)]

    def spooled(n: int) -> Callable[[], bool]:
        return lambda: stream.stats().spool_records == n

    for batch in batches:
        done = spooled(stream.stats().spool_records + len(batch))
        stream.publish_batch(batch)  # one spool group each: segments roll between groups
        await until(done, "a batch to be spooled")
    spool_dir = next((tmp_path / "stream-spool").rglob("*.seg")).parent
    segments = sorted(spool_dir.glob("*.seg"))
    assert len(segments) >= 3
    gone = segments[1]
    first = int(gone.stem)
    last = int(segments[2].stem) - 1
    gone.unlink()  # a person's or a cleanup script's doing
    failures = stream.stats().failures
    await until(lambda: stream.stats().failures >= failures + 3, "three failed drains")
    lost = last - first + 1
    assert stream.stats().dropped_items == lost
    server.start()
    await stream.flush(timeout=30)
    stats = stream.stats()
    await stream.aclose()
    assert stats.dropped_items == lost
    assert stats.published_items == 60 - lost
    kept = [t for batch in batches for t in batch]
    del kept[first - 1 : last]  # LSNs count from 1
    await replay_from_stream(storage, target.url, **target.replay_options())
    assert await tick_rows(postgres_url, pg_schema) == expected_ticks(kept)
    await delete_nats_stream(server.url, target.names["stream"])


# --------------------------------------------------------------------------- Redis limits


@pytest.mark.redis
async def test_redis_maxlen_trims_the_oldest_entries(
    redis_url: str, redis_prefix: str, storage: PostgresStorage, postgres_url: str, pg_schema: str
) -> None:
    key = f"{redis_prefix}:backup"
    stream = RedisBackupStream(redis_url, key=key, maxlen=5, approximate=False, coalesce_items=1)
    await stream.start()
    batches = [ticks(start, 10) for start in range(0, 200, 10)]
    for batch in batches:
        stream.publish_batch(batch)
    await stream.flush(timeout=30)
    await stream.aclose()
    client = Redis.from_url(redis_url)
    try:
        assert await client.xlen(key) == 5
    finally:
        await client.aclose()
    report = await replay_from_stream(storage, redis_url, key=key)
    # Only the last five batches are left; the fifteen before them are gone for good.
    assert report.messages == 5
    assert await tick_rows(postgres_url, pg_schema) == expected_ticks(
        [t for batch in batches[-5:] for t in batch]
    )


@pytest.mark.redis
async def test_redis_approximate_maxlen_keeps_at_least_maxlen(
    redis_url: str, redis_prefix: str
) -> None:
    key = f"{redis_prefix}:backup"
    stream = RedisBackupStream(redis_url, key=key, maxlen=10, coalesce_items=1)
    await stream.start()
    for start in range(0, 300):
        stream.publish_batch(ticks(start, 1))
    await stream.flush(timeout=30)
    await stream.aclose()
    client = Redis.from_url(redis_url)
    try:
        length = await client.xlen(key)
    finally:
        await client.aclose()
    # Whole nodes are trimmed: at least maxlen entries remain, and far fewer than 300.
    assert 10 <= length < 300


@pytest.mark.postgres
async def test_a_failed_initialize_stops_the_backup_stream_and_frees_its_spool(
    postgres_url: str,
    pg_schema: str,
    redis_url: str,
    redis_key: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def failing_start(self: IngestPipeline) -> None:
        raise JournalError("simulated: the write path cannot start")

    monkeypatch.setattr(IngestPipeline, "start", failing_start)
    settings = DataManagerSettings(
        postgres=pg_settings(postgres_url, pg_schema),
        watch_strategy=False,
        journal_dir=tmp_path / "journal",
        backup_stream_url=redis_url,
        backup_stream_key=redis_key,
    )
    router = DataRouter(settings, strategy=plain_strategy())
    with pytest.raises(JournalError):
        await router.initialize()  # as `async with DataRouter(...)` does: no close() after
    assert router._backup is None  # stopped by the teardown
    spool = Journal(tmp_path / "journal" / SPOOL_DIR, instance_id=router.instance_id)
    try:
        await spool.open()  # its lock is free (the folder may be gone: nothing was left)
    except JournalLockedError as exc:
        pytest.fail(f"backup stream still running after a failed initialize: {exc}")
    await spool.close()
    await router.close()


class _Hanging(RedisBackupStream):
    """A stream server that accepts the connection but never answers (until released)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sending = asyncio.Event()
        self.release = asyncio.Event()

    async def _send(self, message: Any) -> bool:
        self.sending.set()
        await self.release.wait()
        return await super()._send(message)


async def _adopted_records(redis_url: str, key: str, root: Path) -> int:
    """Start another instance on the same spool root; how many records it adopted."""
    other = RedisBackupStream(redis_url, key=key, spool_dir=root)
    await other.start()
    try:
        return other.stats().spool_records
    finally:
        # Do not publish (keeps the check simple): close at once, the spool stays on disk.
        await other.aclose(timeout=0)


async def _closing_with_100_pending(
    redis_url: str, key: str, root: Path, close_timeout: float | None
) -> tuple[_Hanging, asyncio.Task[None]]:
    """A stream whose server hangs on 100 accepted ticks, and its aclose() under way."""
    stream = _Hanging(redis_url, key=key, spool_dir=root)
    await stream.start()
    stream.publish_batch(ticks(0, 100))
    await asyncio.wait_for(stream.sending.wait(), 10)
    closing = asyncio.create_task(stream.aclose(timeout=close_timeout))
    await until(lambda: stream.stats().state == "closing", "close to begin")
    return stream, closing


async def test_a_cancelled_aclose_still_spools_what_is_pending_and_unlocks(
    redis_url: str, redis_key: str, tmp_path: Path
) -> None:
    root = tmp_path / "stream-spool"
    stream, closing = await _closing_with_100_pending(redis_url, redis_key, root, None)
    closing.cancel()  # the caller's own deadline (e.g. a CLI's second signal)
    with pytest.raises(asyncio.CancelledError):
        await closing
    # A later close must finish the job (or the cancelled one must have).
    async with asyncio.timeout(10):
        await stream.aclose(timeout=1)
    assert stream.stats().state == "closed"
    # The 100 accepted items are in the spool on disk and another instance can adopt them.
    assert await _adopted_records(redis_url, redis_key, root) == 100


async def test_a_second_aclose_waits_for_the_first(
    redis_url: str, redis_key: str, tmp_path: Path
) -> None:
    root = tmp_path / "stream-spool"
    stream, first = await _closing_with_100_pending(redis_url, redis_key, root, 1.0)
    await stream.aclose()  # e.g. router.close() and an `async with` exit racing
    state = stream.stats().state
    await first
    assert state == "closed", "the second aclose() returned before the shutdown was done"


async def test_a_cancelled_start_gives_back_its_spool(
    redis_url: str, redis_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "stream-spool"
    gate = threading.Event()
    entered = threading.Event()
    real = stream_module.find_orphans

    def slow_find_orphans(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        gate.wait(10)  # a slow scan of the spool folder
        return real(*args, **kwargs)

    monkeypatch.setattr(stream_module, "find_orphans", slow_find_orphans)
    stream = RedisBackupStream(redis_url, key=redis_key, spool_dir=root, instance_id="inst-s")
    starting = asyncio.create_task(stream.start())
    await until(entered.is_set, "adoption to begin")
    starting.cancel()  # e.g. router.initialize() under a timeout
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await starting
    await stream.aclose()
    monkeypatch.setattr(stream_module, "find_orphans", real)

    # The same instance restarting in this process (a retried initialize) must get its spool.
    again = RedisBackupStream(redis_url, key=redis_key, spool_dir=root, instance_id="inst-s")
    try:
        await again.start()
    except JournalLockedError as exc:
        pytest.fail(f"the cancelled start() still holds its spool: {exc}")
    await again.aclose()


async def _child_publishes_on_its_own_stream(router: DataRouter, parent: object) -> int:
    """In a forked child (a new event loop): the exit code says what failed."""
    await router.save_ticks([])  # first use in the child: it reconnects
    backup = router._backup
    if backup is None or backup is parent:
        return 3  # still the parent's stream object, whose tasks belong to the parent
    await router.save_ticks(ticks(T0 + 1_000, 25))  # bulk: stored, not streamed
    for tick in ticks(T0 + 2_000, 25):
        await router.save_tick(tick)  # buffered: streamed with its batch
    await router.flush()
    await backup.flush(timeout=DEADLINE)  # the stream acknowledges after the database
    if backup.stats().published_items < 25:
        return 4
    await router.close()
    return 0


@pytest.mark.postgres
async def test_a_forked_child_publishes_on_a_backup_stream_of_its_own(
    postgres_url: str, pg_schema: str, redis_url: str, redis_key: str, tmp_path: Path
) -> None:
    from tests.integration.test_router_coherence import _fork_and_run, _wait_child

    settings = DataManagerSettings(
        postgres=pg_settings(postgres_url, pg_schema),
        watch_strategy=False,
        journal_dir=tmp_path / "journal",
        backup_stream_url=redis_url,
        backup_stream_key=redis_key,
    )
    router = DataRouter(settings, strategy=plain_strategy())
    await router.initialize()
    try:
        await router.save_tick(ticks(T0, 1)[0])
        await router.flush()
        parent = router._backup
        assert parent is not None
        await parent.flush(timeout=DEADLINE)  # the stream acknowledges after the database
        before = parent.stats().published_items

        pid = _fork_and_run(lambda: _child_publishes_on_its_own_stream(router, parent))
        assert await _wait_child(pid) == 0

        client = Redis.from_url(redis_url)
        try:
            entries = await client.xrange(redis_key)
        finally:
            await client.aclose()
        streamed = sum(
            len(orjson.loads(fields[b"payload"])["items"])
            for _, fields in entries
            if fields[b"kind"] == b"tick"
        )
        assert streamed == before + 25  # the child's 25 buffered ticks reached the stream
        assert router._backup is parent  # the parent's stream goes on, untouched
        await router.save_tick(ticks(T0 + 3_000, 1)[0])
        await router.flush()
        await parent.flush(timeout=DEADLINE)
        assert parent.stats().published_items == before + 1
    finally:
        await router.close()


# --------------------------------------------------------------------------- health probe


async def test_an_idle_stream_answers_a_health_probe(target: Target, tmp_path: Path) -> None:
    stream = target.make(spool_dir=tmp_path)
    try:
        await stream.start()
        assert await stream.probe(5.0) is None
        assert stream.stats().state == "up"
    finally:
        await stream.aclose()


def dead_redis_url() -> str:
    return dead_nats_url().replace("nats://", "redis://")


@pytest.mark.parametrize("backend", ["nats", "redis"])
async def test_a_probe_finds_an_idle_streams_server_gone(backend: str, tmp_path: Path) -> None:
    # Nothing published: before the probe the stream had no reason to think it down.
    url = dead_nats_url() if backend == "nats" else dead_redis_url()
    names = nats_names() if backend == "nats" else {"key": "dmtest:never-written"}
    stream = Target(backend, url, names).make(spool_dir=tmp_path)
    try:
        await stream.start()
        assert stream.stats().state == "up"
        reason = await stream.probe(5.0)
        assert reason is not None
        assert stream.stats().state == "down"
        assert stream.stats().last_error
    finally:
        await stream.aclose()


@pytest.mark.redis
async def test_a_probe_finds_a_redis_key_of_another_type(
    redis_url: str, redis_key: str, tmp_path: Path
) -> None:
    client = Redis.from_url(redis_url, socket_timeout=10)
    stream = Target("redis", redis_url, {"key": redis_key}).make(spool_dir=tmp_path)
    try:
        await client.set(redis_key, "not a stream")
        await stream.start()
        reason = await stream.probe(5.0)
        assert reason is not None
        assert "something other than a stream" in reason
        assert (stream.stats().last_error or "").startswith("configuration error:")
        await client.unlink(redis_key)
        assert await stream.probe(5.0) is None
        assert stream.stats().state == "up"
    finally:
        await stream.aclose()
        await client.aclose()


@pytest.mark.postgres
async def test_health_reports_an_idle_backup_stream_whose_server_is_gone(
    postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    settings = DataManagerSettings(
        postgres=pg_settings(postgres_url, pg_schema),
        watch_strategy=False,
        journal_dir=tmp_path / "journal",
        backup_stream_url=dead_redis_url(),
        backup_stream_key="dmtest:never-written",
    )
    async with DataRouter(settings, strategy=plain_strategy()) as router:
        health = await router.health_check()
        assert health.status == "degraded"
        assert "backup stream" in health.reason
        assert health.write_path.details["backup_stream_state"] == "down"


@pytest.mark.redis
async def test_a_probe_cut_short_by_close_reports_nothing(
    redis_url: str, redis_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = Target("redis", redis_url, {"key": redis_key}).make(spool_dir=tmp_path)
    checking = asyncio.Event()
    real_check = RedisBackupStream._check

    async def slow_check(self: RedisBackupStream) -> None:
        checking.set()
        await asyncio.Event().wait()  # until closing cancels the publishing task
        await real_check(self)

    monkeypatch.setattr(RedisBackupStream, "_check", slow_check)
    await stream.start()
    probe = asyncio.create_task(stream.probe(30.0))
    await checking.wait()
    await stream.aclose()
    assert await probe is None  # closing is not a failure of the server
