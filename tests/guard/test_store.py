"""The review store: migrations, lossless inputs, label validation, export, alerts, bad URLs —
on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import sqlalchemy as sa

from advx.data import load
from advx.errors import InputError
from advx.guard.store import SCHEMA_REVISION, Store, default_url, mask_url

from .._postgres import postgres_server
from .._server import free_port


def _item(x, **kw) -> dict:
    item = {
        "input": x.tolist() if hasattr(x, "tolist") else x,
        "shape": list(x.shape) if hasattr(x, "shape") else None,
        "action": "abstain",
        "label": None,
        "predicted": 3,
        "confidence": 0.41,
        "scores": {"feature_squeezing": 0.73},
        "reasons": ["feature_squeezing > 0.61"],
        "model_version": "v1",
        "policy_hash": "p" * 16,
        "client": "alice",
        "request_id": "r-1",
        "time": 1_700_000_000.0,
    }
    item.update(kw)
    return item


@pytest.fixture(scope="module")
def pg_url():
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'guard.db'}", classes=10)
    else:
        url = request.getfixturevalue("pg_url")
        s = Store(url, classes=10)
        with s._engine.begin() as conn:  # one server per module: start each test empty
            conn.execute(sa.text("TRUNCATE review_items, alerts RESTART IDENTITY"))
    yield s
    s.close()


def test_migrates_an_empty_database_and_reopens_it(tmp_path):
    url = f"sqlite:///{tmp_path / 'sub' / 'guard.db'}"
    with Store(url) as s:
        assert s.revision == SCHEMA_REVISION
        s.put([_item(np.zeros((1, 2, 2), np.float32))])
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        names = set(sa.inspect(conn).get_table_names())
        assert {"review_items", "alerts", "store_meta", "alembic_version"} <= names
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "0001"
    engine.dispose()
    with Store(url) as again:  # opening again upgrades nothing and keeps the data
        assert again.revision == SCHEMA_REVISION
        assert again.count() == 1


def test_the_schema_revision_is_recorded(store):
    assert store.revision == SCHEMA_REVISION


def test_a_database_from_a_newer_advx_is_refused_with_the_reason(tmp_path):
    url = f"sqlite:///{tmp_path / 'guard.db'}"
    Store(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
    engine.dispose()
    with pytest.raises(InputError, match="newer advx"):
        Store(url)


def test_several_processes_may_open_a_fresh_database_at_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'guard.db'}"
    errors: list[BaseException] = []

    def open_and_put(k: int) -> None:
        try:
            with Store(url) as s:
                s.put([_item(np.full((2,), k, np.float32), request_id=f"r{k}")])
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=open_and_put, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with Store(url) as s:
        assert s.count() == 6


def test_inputs_come_back_bit_for_bit(store):
    rng = np.random.default_rng(0)
    x = rng.random((1, 28, 28), dtype=np.float32)
    x[0, 0, 0] = np.nextafter(np.float32(0.5), np.float32(1))  # a float64 round trip would move it
    odd = np.array([np.nan, np.inf, -3.0], np.float32)  # what validation rejects is kept too
    ragged = [[1, 2], [3]]
    store.put([_item(x), _item(odd, action="reject"), _item(ragged, action="reject")])
    items = store.list()
    assert [i["action"] for i in items] == ["abstain", "reject", "reject"]
    first = store.get(items[0]["id"])
    assert first["input"].dtype == np.float32 and first["input"].shape == (1, 28, 28)
    assert first["input"].tobytes() == x.tobytes()
    assert first["predicted"] == 3 and first["scores"] == {"feature_squeezing": 0.73}
    assert first["reasons"] == ["feature_squeezing > 0.61"]
    assert first["client"] == "alice" and first["model_version"] == "v1"
    assert first["created"].startswith("2023-11-14T22:13:20")
    assert store.get(items[1]["id"])["input"].tobytes() == odd.tobytes()
    assert store.get(items[2]["id"])["input"] == ragged


def test_a_changed_input_is_caught_by_its_hash(tmp_path):
    url = f"sqlite:///{tmp_path / 'guard.db'}"
    with Store(url) as s:
        s.put([_item(np.zeros((4,), np.float32))])
        with s._engine.begin() as conn:
            conn.execute(sa.text("UPDATE review_items SET input = :b"), {"b": b"\0" * 15 + b"\1"})
        with pytest.raises(InputError, match="sha256"):
            s.get(1)


def test_labels_outside_the_classes_are_refused(store):
    store.put([_item(np.zeros((2,), np.float32))])
    (item,) = store.list()
    for bad in (10, -1, True, "3", 2.0):
        with pytest.raises(InputError, match="label"):
            store.label(item["id"], bad, by="bob")
    assert store.get(item["id"])["status"] == "queued"
    with pytest.raises(InputError, match="no review item 99"):
        store.label(99, 1, by="bob")
    with pytest.raises(InputError, match="by"):
        store.label(item["id"], 1, by=" ")
    done = store.label(item["id"], 9, by="bob")
    assert done["label"] == 9 and done["status"] == "labelled" and done["labelled_by"] == "bob"
    assert done["labelled_at"] is not None
    assert store.list() == [] and [i["id"] for i in store.list(status="labelled")] == [item["id"]]


def test_the_class_count_is_recorded_or_read_from_the_item(tmp_path):
    url = f"sqlite:///{tmp_path / 'guard.db'}"
    with Store(url) as s:
        s.put([_item(np.zeros(2, np.float32))])
        with pytest.raises(InputError, match="number of classes"):
            s.label(1, 0, by="bob")
        s.put([_item(np.zeros(2, np.float32), probs=[0.2, 0.5, 0.3])])
        with pytest.raises(InputError, match=r"\[0, 2\]"):
            s.label(2, 3, by="bob")
        assert s.label(2, 2, by="bob")["label"] == 2
    Store(url, classes=4).close()
    with Store(url) as s:  # recorded by the service's open, found by the reviewer's
        assert s.classes == 4
        assert s.label(1, 3, by="bob")["label"] == 3
        s.set_classes(3)  # the service learnt it after opening
        with pytest.raises(InputError, match=r"\[0, 2\]"):
            s.label(1, 3, by="bob")
        with pytest.raises(InputError, match="classes"):
            s.set_classes(1)
    with Store(url) as s:
        assert s.classes == 3


def test_export_writes_a_data_set_advx_loads(store, tmp_path):
    rng = np.random.default_rng(1)
    xs = rng.random((3, 1, 4, 4), dtype=np.float32)
    store.put([_item(x) for x in xs] + [_item(np.full((1, 4, 4), 2.0, np.float32))])
    ids = [i["id"] for i in store.list()]
    store.label(ids[0], 7, by="bob")
    store.label(ids[2], 1, by="bob")
    store.label(ids[3], 0, by="bob")  # out of [0, 1]: no image; left out and counted
    out = tmp_path / "labelled.npz"
    summary = store.export(out)
    assert summary == {"path": str(out), "items": 2, "skipped": 1, "shape": [1, 4, 4]}
    x, y = load(out)
    assert x.shape == (2, 1, 4, 4) and y.tolist() == [7, 1]
    assert np.array_equal(x.numpy(), xs[[0, 2]])
    with pytest.raises(InputError, match="exists; pass --force"):
        store.export(out)
    store.label(ids[1], 5, by="bob")
    assert store.export(out, force=True)["items"] == 3
    assert load(out)[1].tolist() == [7, 5, 1]
    with pytest.raises(InputError, match=r"\.npz"):
        store.export(tmp_path / "labelled.csv")


def test_export_with_nothing_labelled_says_so(tmp_path):
    with Store(f"sqlite:///{tmp_path / 'guard.db'}", classes=10) as s:
        with pytest.raises(InputError, match="no labelled images"):
            s.export(tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()


def test_alerts_are_recorded_newest_first(store):
    store.alert("mallory", 12, 0.93)
    store.alert("eve", 40, 0.81, detail={"detector": "blacklight"})
    alerts = store.alerts()
    assert [(a["client"], a["queries"], a["score"]) for a in alerts] == [
        ("eve", 40, 0.81),
        ("mallory", 12, 0.93),
    ]
    assert alerts[0]["detail"] == {"detector": "blacklight"} and alerts[0]["time"]
    assert [a["client"] for a in store.alerts(client="mallory")] == ["mallory"]


def test_an_unreachable_database_is_named_without_its_password():
    url = f"postgresql://advx:s3cret-pw@127.0.0.1:{free_port()}/guard"
    with pytest.raises(InputError) as e:
        Store(url)
    message = str(e.value)
    assert "s3cret-pw" not in message
    assert f"postgresql+psycopg://advx:***@127.0.0.1:{url.split(':')[3]}" in message
    assert "cannot open the database" in message
    assert mask_url(url) == url.replace("s3cret-pw", "***")


def test_bad_urls_and_arguments_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not a database URL"):
        Store("no scheme here")
    with pytest.raises(InputError, match="no database driver"):
        Store("nosuchdb://x/y")
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="cannot make the folder"):
        Store(f"sqlite:///{tmp_path / 'file' / 'guard.db'}")
    with pytest.raises(InputError, match="cannot open the database sqlite"):
        Store(f"sqlite:///{tmp_path}")  # a folder, not a database file
    with pytest.raises(InputError, match="classes"):
        Store(f"sqlite:///{tmp_path / 'g.db'}", classes=1)
    with Store(f"sqlite:///{tmp_path / 'g.db'}") as s:
        with pytest.raises(InputError, match="status"):
            s.list(status="done")
        with pytest.raises(InputError, match="items\\[0\\]"):
            s.put([{"shape": [1]}])


def test_the_default_store_lives_in_the_state_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_url() == f"sqlite:///{tmp_path}/advx/guard.db"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_url() == f"sqlite:///{tmp_path}/.local/state/advx/guard.db"


WORKER = """
import sys
import numpy as np
from advx.guard.store import Store

url, name = sys.argv[1], sys.argv[2]
with Store(url) as s:
    for n in range(50):
        x = np.full((1, 4, 4), n / 50, np.float32)
        s.put([{"input": x, "action": "review", "client": name, "request_id": f"{name}-{n}"}])
"""


@pytest.mark.slow  # process start-up (torch) under load; threads cover concurrent writers
def test_several_worker_processes_write_one_sqlite_file(tmp_path):
    """`advx serve --workers N` on the default store: N processes commit to one SQLite file."""
    import os
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'guard.db'}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, f"w{k}"], env=env, stderr=subprocess.PIPE
        )
        for k in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
    with Store(url) as s:
        items = s.list(status="all", limit=1000)
        assert len(items) == 100
        assert {i["request_id"] for i in items} == {
            f"w{k}-{n}" for k in range(2) for n in range(50)
        }
        with s._engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
