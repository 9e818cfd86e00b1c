"""data_manager routing strategy (hot-reloaded).

This file is DATA, not code: the router reads it with ast.literal_eval and never imports or
executes it. It must hold exactly one statement, the assignment below, whose value may only
use literal dicts, lists, strings, numbers, booleans and None (no names, calls, arithmetic
or f-strings). Comments are free.

Edits are picked up while the router runs (checked every DATA_MANAGER_STRATEGY_POLL_SECONDS,
default 1 s). An invalid edit is rejected with an ERROR log naming the problem, shows in
health_check() as the strategy's last_error, and the last good strategy keeps serving.
Save with an atomic rename (most editors do) so a half-written file is never read.

Every key is optional: whatever is left out takes the built-in default. The values below
ARE the built-in defaults. Fields marked "restart required" are refused on reload; change
them and restart the process.
"""

DATA_MANAGER_STRATEGY = {
    # Optional free label (int or str) shown in health output, e.g. "2024-10-03.1".
    # "version": None,
    # Operation -> backends. "timescale" is the configured database (PostgreSQL/TimescaleDB,
    # or the embedded SQLite); "dragonfly_cache" is the L2 Redis-protocol cache. The L1
    # in-process cache is always consulted first and is not named here.
    # Every route must name "timescale"; a read route must end with it (caches first, the
    # database as the last resort). For writes the order does not matter: L2 is updated on
    # its own fast path. Range reads (get_ticks, get_candles) are database-only.
    "routing": {
        "save_tick": ["timescale", "dragonfly_cache"],
        "save_candle": ["timescale", "dragonfly_cache"],
        "save_order_flow": ["timescale", "dragonfly_cache"],
        "get_latest_tick": ["dragonfly_cache", "timescale"],
        "get_latest_candles": ["dragonfly_cache", "timescale"],
        "get_latest_order_flow": ["dragonfly_cache", "timescale"],
        "get_ticks": ["timescale"],
        "get_candles": ["timescale"],
    },
    # Seconds; every TTL must be > 0.
    "cache": {
        "tick_ttl_seconds": 3600,  # L2 latest tick per symbol
        "candle_ttl_seconds": 3600,  # L2 candle ring per (symbol, timeframe, source)
        "order_flow_ttl_seconds": 3600,  # L2 latest order flow per symbol
        # L1 is kept current by pub/sub; its TTLs are only a safety net.
        "l1_tick_ttl_seconds": 60,
        "l1_candle_ttl_seconds": 60,
        "l1_order_flow_ttl_seconds": 60,
        "l1_max_entries": 50_000,  # LRU bound of the in-process cache
        "candle_ring_size": 200,  # latest candles kept per series; restart required
    },
    # Write-behind batching: flush at `size` items or after `flush_interval_seconds`.
    "batch": {
        "size": 100,
        "journal_size": 2_000,  # ...counting journal-mode items (already on disk)
        "flush_interval_seconds": 1.0,
        "max_queue": 100_000,  # back-pressure bound; restart required
        "put_timeout_seconds": None,  # how long a save waits on a full queue; None = forever
        "max_batch": 50_000,  # upper bound of one group commit under load
    },
    # Age (seconds) after which the latest value counts as stale.
    "staleness": {
        "tick_seconds": 2,
        "order_flow_seconds": 5,
        # For 1m candles (two bars); other timeframes scale by their length in minutes
        # (1h -> 7200) unless named in per_timeframe, e.g. {"1h": 5400, "1d": 172800}.
        "candle_seconds": 120,
        "per_timeframe": {},
    },
    "sources": {
        # Source used when a candle read names none: the first listed that has candles,
        # else the source with the newest candle. Example: ["polygon", "twelve-data"].
        "candle_preference": [],
    },
    # Ticks -> candles inside the router.
    "aggregation": {
        "enabled": True,
        "timeframes": ["1m", "5m", "1h"],  # any of 1m 5m 15m 30m 1h 4h 1d 1w
        "price": "mid",  # "mid" | "bid" | "ask" | "last"
        "disabled_symbols": [],  # e.g. ["EUR/USD"]; "EUR_USD" and "EURUSD" mean the same
        "late_policy": "drop",  # tick older than a closed bucket: "drop" | "rebuild"
        "idle_close_grace_seconds": 2.0,  # close a bucket this long after its end
        "daily_close": "utc",  # "utc" | "new_york_17"; restart required
        # Forming bars reach L2, other routers and subscribers at most this often per series
        # (0: every event-loop pass); closed bars go at once; this router's reads always see
        # the current bar.
        "publish_interval_seconds": 0.1,
    },
    # Order-flow metrics (OFI, volume delta, imbalance, VWAP, VPIN) from ticks that carry
    # bid/ask sizes and trades with an aggressor side; ticks without them add nothing.
    "order_flow": {
        "enabled": True,
        "window_seconds": 60.0,  # rolling window
        "vpin_bucket_volume": 1_000_000.0,  # volume per VPIN bucket (instrument units)
        "vpin_buckets": 50,  # buckets averaged by VPIN
        # Metrics reach the caches, other routers and subscribers at most this often per
        # symbol (0: every event-loop pass); this router's reads always see the current ones.
        "publish_interval_seconds": 0.1,
    },
    # Live subscriptions: items buffered per subscriber; a slow consumer loses the oldest
    # (counted), so memory stays bounded.
    "subscriptions": {
        "buffer_size": 10_000,
    },
    # Publish every accepted batch to the backup stream named by DATA_MANAGER_BACKUP_STREAM_URL
    # (NATS JetStream or Redis Streams); without that setting this section does nothing.
    "backup_stream": {
        "enabled": True,
    },
}
