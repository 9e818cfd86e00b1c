"""Typed health report returned by ``DataRouter.health_check()``.

Nothing here performs I/O; the router gathers the facts (each probe bounded by
``health_timeout_seconds``) and :func:`overall_status` turns them into one verdict:

* ``unhealthy`` — the database is unreachable (reads and synchronous writes fail);
* ``degraded`` — the database answers but something else is wrong: L2 configured and down,
  a circuit breaker open, journal backlog, a rejected strategy edit;
* ``healthy`` — everything configured answers.

Reports never contain secrets: only host, port, database and user names.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CacheHealth",
    "DatabaseHealth",
    "HealthCheckResponse",
    "HealthStatus",
    "PoolHealth",
    "ProcessorHealth",
    "ReplicaHealth",
    "StrategyHealth",
    "TierStats",
    "WritePathHealth",
    "overall_status",
]

HealthStatus = Literal["healthy", "degraded", "unhealthy"]


class _Report(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ReplicaHealth(_Report):
    """One PostgreSQL read replica."""

    target: str
    healthy: bool
    lag_seconds: float | None = None
    lag_bytes: int | None = None
    skipped_reason: str | None = None
    reads: int = 0
    errors: int = 0


class DatabaseHealth(_Report):
    """One database backend."""

    kind: str = Field(description="postgresql or sqlite")
    target: str = Field(description="host:port/database or file path; never a password")
    reachable: bool
    latency_ms: float | None = None
    version: str | None = None
    timescaledb: bool = False
    timescaledb_version: str | None = None
    embedded: bool = False
    error: str | None = None
    replicas: list[ReplicaHealth] = Field(default_factory=list)
    timescaledb_policies: list[str] = Field(
        default_factory=list, description="TimescaleDB jobs on the SDK's tables: table:policy."
    )


class PoolHealth(_Report):
    """Connection pool usage."""

    size: int
    in_use: int
    idle: int
    waiting: int
    max_size: int


class TierStats(_Report):
    """Hits and misses of one cache tier."""

    hits: int = 0
    misses: int = 0
    hit_rate: float | None = None
    errors: int = 0


class CacheHealth(_Report):
    """Both cache tiers."""

    l1: TierStats = Field(default_factory=TierStats)
    l2: TierStats = Field(default_factory=TierStats)
    l2_configured: bool = False
    l2_reachable: bool | None = None
    l2_latency_ms: float | None = None
    l2_target: str | None = None
    l2_version: str | None = None
    l2_circuit: str | None = None
    l2_write_refused: str | None = Field(
        default=None, description="The server's refusal of the last L2 write, if it was refused."
    )
    l1_entries: int = 0
    l1_bytes_estimate: int = 0
    subscription: str | None = Field(
        default=None, description="pub/sub state: connected, lost, or None without L2"
    )
    details: dict[str, float | int | str | None] = Field(default_factory=dict)
    operations: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="Tier counters per read operation."
    )
    evictions: int = 0
    cluster_nodes: dict[str, bool] = Field(
        default_factory=dict, description="Redis Cluster masters: usable or not."
    )
    served_age_seconds: dict[str, float | int | None] = Field(
        default_factory=dict, description="Event-time age of sampled L1 answers."
    )


class WritePathHealth(_Report):
    """Write path: mode, queue and journal."""

    default_mode: str
    queue_depth: int = 0
    journal_records: int = 0
    journal_bytes: int = 0
    circuit: str = "closed"
    details: dict[str, float | int | str | None] = Field(default_factory=dict)


class ProcessorHealth(_Report):
    """One real-time processor."""

    calls: int = 0
    errors: int = 0
    slow: bool = False
    last_error: str | None = None


class StrategyHealth(_Report):
    """The routing strategy in force."""

    file: str | None = None
    version: int = 0
    content_hash: str | None = None
    last_error: str | None = None
    reloads: int = 0


class HealthCheckResponse(_Report):
    """The answer of ``DataRouter.health_check()``."""

    status: HealthStatus
    reason: str
    checked_at_ms: int
    databases: dict[str, DatabaseHealth]
    cache: CacheHealth
    connection_pools: dict[str, PoolHealth]
    write_path: WritePathHealth
    strategy: StrategyHealth
    staleness: dict[str, dict[str, bool]] = Field(default_factory=dict)
    processors: dict[str, ProcessorHealth] = Field(default_factory=dict)


def overall_status(
    databases: dict[str, DatabaseHealth],
    cache: CacheHealth,
    write_path: WritePathHealth,
    strategy: StrategyHealth,
) -> tuple[HealthStatus, str]:
    """Reduce the component reports to one status and a human-readable reason."""
    down = [name for name, db in databases.items() if not db.reachable]
    if down:
        return "unhealthy", f"database unreachable: {', '.join(down)}"
    problems: list[str] = []
    for db in databases.values():
        for replica in db.replicas:
            if not replica.healthy:
                problems.append(
                    f"read replica {replica.target} skipped ({replica.skipped_reason}); "
                    "its reads go to the primary"
                )
    if cache.l2_configured and not cache.l2_reachable:
        problems.append("L2 cache unreachable; reads fall back to the database")
    elif cache.l2_write_refused:
        problems.append(
            f"L2 cache refuses writes ({cache.l2_write_refused[:200]}); it keeps older values"
        )
    down_nodes = [node for node, up in cache.cluster_nodes.items() if not up]
    if down_nodes:
        problems.append(f"L2 cluster nodes failing: {', '.join(down_nodes)}")
    if cache.subscription == "lost":
        problems.append("cache pub/sub subscription lost; L1 bypassed")
    if write_path.circuit != "closed":
        problems.append(f"database write circuit {write_path.circuit}")
    if write_path.details.get("backup_stream_state") == "down":
        problems.append("backup stream down; batches are spooled locally")
    elif write_path.details.get("backup_stream_check_error"):
        problems.append(
            f"backup stream check failed: {write_path.details['backup_stream_check_error']}"
        )
    if write_path.details.get("backlog_journals"):
        # Spilled while the database was down, or left by a dead router: a replay is owed.
        # (Journal-mode records waiting for their batch are normal operation.)
        problems.append(f"{write_path.journal_records} records waiting in the journal")
    if strategy.last_error:
        problems.append("last strategy edit rejected")
    if problems:
        return "degraded", "; ".join(problems)
    return "healthy", "all configured backends answer"
