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
