"""Nothing the service acknowledged is lost: the guard's HTTP service (`advx serve --store URL`
when the command has the option, else the same app built with advx.guard.service.create_app)
with the store as its review queue, killed with SIGKILL while 16 clients
send it inputs it holds for review, leaves every acknowledged item in the store, whole and
once, and the database consistent — on SQLite (WAL) and on a real PostgreSQL server."""

from __future__ import annotations

import pytest

from .._postgres import postgres_server
from ._durability import kill_test


def _check(result) -> None:
    assert not result.errors, result.errors
    assert result.acknowledged >= 100  # the writer worked before it died
    assert result.missing == []  # every acknowledged item is stored, with its bytes
    assert result.stored >= result.acknowledged
    assert result.unknown == [] and result.duplicates == 0
    assert result.integrity == "ok"


def test_sqlite_keeps_every_acknowledged_item_through_kill_9(tmp_path):
    url = f"sqlite:///{tmp_path / 'guard.db'}"
    result = kill_test(url, cwd=tmp_path, kill_after=120, service=True)
    _check(result)


def test_postgresql_keeps_every_acknowledged_item_through_kill_9(tmp_path):
    with postgres_server() as url:
        result = kill_test(url, cwd=tmp_path, kill_after=120, service=True)
    _check(result)


@pytest.mark.parametrize("db", ["sqlite"])
def test_the_check_catches_a_writer_that_acknowledges_without_storing(tmp_path, monkeypatch, db):
    """The harness itself: a queue that drops writes is reported as missing items (a minimal
    writer that acknowledges without calling put)."""
    from . import _durability

    monkeypatch.setattr(
        _durability,
        "WRITER",
        _durability.WRITER.replace("await run_in_threadpool(store.put, items)", "pass"),
    )
    result = kill_test(f"sqlite:///{tmp_path / 'guard.db'}", cwd=tmp_path, kill_after=20)
    assert result.acknowledged >= 20 and len(result.missing) == result.acknowledged
