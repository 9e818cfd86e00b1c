"""How the component reports reduce to one health status."""

from __future__ import annotations

import pytest

from data_manager.health import (
    CacheHealth,
    DatabaseHealth,
    StrategyHealth,
    WritePathHealth,
    overall_status,
)


@pytest.mark.parametrize(
    ("backlog", "expected"), [(0, "healthy"), (1, "degraded")], ids=["journal mode", "backlog"]
)
def test_journal_records_degrade_only_while_a_replay_is_owed(backlog: int, expected: str) -> None:
    # Journal-mode records wait for their batch in normal operation; a backlog (spilled while
    # the database was down, or a dead router's journal) is owed a replay.
    write_path = WritePathHealth(
        default_mode="journal", journal_records=300, details={"backlog_journals": backlog}
    )
    db = {"primary": DatabaseHealth(kind="postgresql", target="db", reachable=True)}
    status, reason = overall_status(db, CacheHealth(), write_path, StrategyHealth())
    assert status == expected
    assert ("300 records waiting in the journal" in reason) is (backlog > 0)


def test_a_backup_stream_check_that_failed_degrades_while_the_state_still_says_up() -> None:
    # The probe timed out: its answer comes later, the state has not changed yet.
    write_path = WritePathHealth(
        default_mode="buffered",
        details={"backup_stream_state": "up", "backup_stream_check_error": "no answer"},
    )
    db = {"primary": DatabaseHealth(kind="postgresql", target="db", reachable=True)}
    status, reason = overall_status(db, CacheHealth(), write_path, StrategyHealth())
    assert (status, reason) == ("degraded", "backup stream check failed: no answer")


def test_an_l2_that_refuses_writes_degrades() -> None:
    cache = CacheHealth(l2_configured=True, l2_reachable=True, l2_write_refused="OOM " * 100)
    db = {"primary": DatabaseHealth(kind="postgresql", target="db", reachable=True)}
    write_path = WritePathHealth(default_mode="buffered")
    status, reason = overall_status(db, cache, write_path, StrategyHealth())
    assert status == "degraded"
    assert reason.startswith("L2 cache refuses writes (OOM OOM")
    assert len(reason) < 260  # the server's message is cut
