"""The guard's store: the human review queue and the query-attack alerts, in a real database.

One :class:`Store` per database, opened from any SQLAlchemy URL. The embedded default is a
SQLite file in WAL mode under the user's state directory (:func:`default_url`); a team points
every service replica and reviewer at one PostgreSQL database instead
(``postgresql://user:pw@host/db``, driven by psycopg).

Durability: :meth:`Store.put` writes a batch in one transaction and returns only after the
database committed it (SQLite ``synchronous=FULL``; PostgreSQL's default commit), so an item
the service acknowledged survives the service being killed. Inputs are kept losslessly: the
float32 bytes, their shape and their sha256, which :meth:`Store.get` checks on the way out.

The schema is versioned with alembic; opening a store upgrades it to the current revision
(under a lock, so several processes may open one database at once) and records the revision.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from .._io import atomic_open, check_writable, sha256_bytes
from ..errors import InputError

__all__ = ["Store", "default_url", "mask_url", "STATUSES", "SCHEMA_REVISION"]

log = logging.getLogger(__name__)

STATUSES = ("queued", "labelled")
SCHEMA_REVISION = "0001"  # the newest migration in migrations/versions

Item = dict[str, Any]
Items = list[Item]

_meta = sa.MetaData()
# Table objects for queries; the schema itself is made by the migrations, never by create_all
_items = sa.Table(
    "review_items",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("created", sa.DateTime(timezone=True)),
    sa.Column("client", sa.String),
    sa.Column("request_id", sa.String),
    sa.Column("input", sa.LargeBinary),
    sa.Column("input_dtype", sa.String),
    sa.Column("input_shape", sa.Text),
    sa.Column("input_sha256", sa.String),
    sa.Column("action", sa.String),
    sa.Column("answered", sa.Integer),
    sa.Column("predicted", sa.Integer),
    sa.Column("confidence", sa.Float),
    sa.Column("probs", sa.Text),
    sa.Column("scores", sa.Text),
    sa.Column("reasons", sa.Text),
    sa.Column("model_version", sa.String),
    sa.Column("policy_hash", sa.String),
    sa.Column("status", sa.String),
    sa.Column("label", sa.Integer),
    sa.Column("labelled_by", sa.String),
    sa.Column("labelled_at", sa.DateTime(timezone=True)),
)
_alerts = sa.Table(
    "alerts",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("time", sa.DateTime(timezone=True)),
    sa.Column("client", sa.String),
    sa.Column("queries", sa.Integer),
    sa.Column("score", sa.Float),
    sa.Column("detail", sa.Text),
)
_settings = sa.Table(
    "store_meta", _meta, sa.Column("key", sa.String, primary_key=True), sa.Column("value", sa.Text)
)

# Columns a listing shows (everything but the input's bytes)
_SUMMARY = [c for c in _items.c if c.name != "input"]
_INPUT = [c for c in _items.c if c.name.startswith("input")]


def default_url() -> str:
    """``sqlite:///`` + ``$XDG_STATE_HOME/advx/guard.db`` (``~/.local/state/advx/guard.db``)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return f"sqlite:///{Path(state) / 'advx' / 'guard.db'}"


def mask_url(url: str | URL) -> str:
    """The URL as a person may see it: the password replaced by ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


class Store:
    """The review queue and the alerts in the database at ``url`` (default :func:`default_url`).

    ``classes`` is the number of classes the served model predicts; a human label must lie in
    ``[0, classes)``. It is recorded in the database, so a reviewer's ``advx review`` finds it
    without being told; without it, an item's own class probabilities (``probs``) decide.
    """

    def __init__(self, url: str | URL | None = None, *, classes: int | None = None) -> None:
        if classes is not None and (
            isinstance(classes, bool) or not isinstance(classes, int) or classes < 2
        ):
            raise InputError(f"Store: classes must be an int >= 2, got {classes!r}")
        self.url = _parse_url(url if url is not None else default_url())
        self.masked_url = mask_url(self.url)
        self._engine = _engine(self.url)
        # writes on SQLite take the write lock up front (BEGIN IMMEDIATE): a transaction that
        # reads first and upgrades to a writer later can fail at once with "database is locked"
        # instead of waiting its turn
        self._writer = self._engine.execution_options(advx_write=True)
        try:
            self._upgrade()
            if classes is not None:
                self._set_setting("classes", str(classes))
        except DBAPIError as e:
            self._engine.dispose()
            raise _unreachable(self.url, e) from None
        self.classes: int | None = classes if classes is not None else self._classes_setting()

    # ---- opening ------------------------------------------------------------------------------
    def _upgrade(self) -> None:
        from alembic import command
        from alembic.config import Config
        from alembic.util import CommandError

        cfg = Config()
        cfg.set_main_option("script_location", str(_migrations()))
        with self._writer.begin() as conn:
            if conn.dialect.name == "postgresql":
                # one migrator at a time; the others wait, then find the schema current
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7283401)"))
            cfg.attributes["connection"] = conn
            try:
                command.upgrade(cfg, "head")
            except CommandError as e:
                # e.g. a database a newer advx migrated: its revision is unknown here
                raise InputError(
                    f"store: cannot bring {self.masked_url} to schema revision "
                    f"{SCHEMA_REVISION}: {e}; is it from a newer advx? (pip install -U advx)"
                ) from None

    @property
    def revision(self) -> str | None:
        """The schema revision the database records (alembic's version table)."""
        from alembic.migration import MigrationContext

        with self._engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.masked_url!r})"

    # ---- writing: the service's side ------------------------------------------------------
    def put(self, items: list[dict]) -> None:
        """Queue ``items`` for review in one transaction; durable once this returns.

        Each item holds ``input`` (a nested list, array or tensor: stored as float32 bytes;
        a row that is not an array at all is stored as its JSON), ``shape``, ``action``,
        ``label`` (what the caller was answered), ``predicted``, ``confidence``, ``scores``,
        ``reasons``, ``model_version``, ``policy_hash``, ``client``, ``request_id`` and
        ``time`` (epoch seconds, ISO 8601 or a datetime; default now); optionally ``probs``,
        the model's class probabilities.
        """
        if not items:
            return
        rows = [_row(item, i) for i, item in enumerate(items)]
        with self._writer.begin() as conn:
            conn.execute(_items.insert(), rows)

    def alert(self, client: str, queries: int, score: float, detail: Any = None) -> None:
        """Record that ``client`` was caught attacking after ``queries`` queries."""
        with self._writer.begin() as conn:
            conn.execute(
                _alerts.insert(),
                {
                    "time": _utcnow(),
                    "client": str(client),
                    "queries": int(queries),
                    "score": float(score),
                    "detail": None if detail is None else _dumps(detail),
                },
            )

    # ---- reading and labelling: the reviewer's side -----------------------------------------
    def list(self, *, status: str = "queued", limit: int = 50, offset: int = 0) -> Items:
        """Items, oldest first, without their input bytes; ``status`` is a status or ``all``."""
        if status not in (*STATUSES, "all"):
            raise InputError(
                f"status: expected one of {', '.join((*STATUSES, 'all'))}, got {status!r}"
            )
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InputError(f"limit: expected a positive int, got {limit!r}")
        query = sa.select(*_SUMMARY).order_by(_items.c.id).limit(limit).offset(offset)
        if status != "all":
            query = query.where(_items.c.status == status)
        with self._engine.connect() as conn:
            return [_summary(r._mapping) for r in conn.execute(query)]

    def count(self, *, status: str = "all") -> int:
        query = sa.select(sa.func.count()).select_from(_items)
        if status != "all":
            query = query.where(_items.c.status == status)
        with self._engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def get(self, id: int) -> Item:
        """One item with its input (``input``: a float32 array, or the row as it came)."""
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(_items).where(_items.c.id == _item_id(id))).first()
        if row is None:
            raise InputError(f"id: no review item {id} in {self.masked_url}")
        item = _summary(row._mapping)
        item["input"] = _decode_input(row._mapping)
        return item

    def label(self, id: int, label: int, *, by: str) -> Item:
        """Record a person's ``label`` for item ``id``; returns the item as stored.

        A label outside the model's classes is refused. Labelling again replaces the label
        (and records who and when).
        """
        item_id = _item_id(id)
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise InputError(f"label: expected a class index (int), got {label!r}")
        if not by or not str(by).strip():
            raise InputError("by: say who labelled the item (a name or an e-mail)")
        with self._writer.begin() as conn:
            row = conn.execute(sa.select(_items.c.probs).where(_items.c.id == item_id)).first()
            if row is None:
                raise InputError(f"id: no review item {id} in {self.masked_url}")
            classes = self.classes or _n_probs(row.probs)
            if classes is None:
                raise InputError(
                    "label: the store does not know the model's number of classes; "
                    "pass --classes N (it is recorded in the store) or open it with "
                    "Store(url, classes=N)"
                )
            if not 0 <= int(label) < classes:
                raise InputError(
                    f"label: expected a class in [0, {classes - 1}] (the model has {classes} "
                    f"classes), got {label}"
                )
            conn.execute(
                _items.update()
                .where(_items.c.id == item_id)
                .values(
                    label=int(label),
                    labelled_by=str(by).strip()[:200],
                    labelled_at=_utcnow(),
                    status="labelled",
                )
            )
        return self.get(item_id)

    def alerts(self, *, limit: int = 100, client: str | None = None) -> Items:
        """The newest alerts first."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InputError(f"limit: expected a positive int, got {limit!r}")
        query = sa.select(_alerts).order_by(_alerts.c.id.desc()).limit(limit)
        if client is not None:
            query = query.where(_alerts.c.client == client)
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            {
                "id": r.id,
                "time": _iso(r.time),
                "client": r.client,
                "queries": r.queries,
                "score": r.score,
                "detail": None if r.detail is None else json.loads(r.detail),
            }
            for r in rows
        ]

    def export(self, path: str | os.PathLike, *, force: bool = False) -> dict[str, Any]:
        """Write the labelled items as a data set advx trains on; returns what was written.

        The file is an ``.npz`` with ``x`` (float32 images in [0, 1], one shape for all) and
        ``y`` (the human labels, int64), the loader :func:`advx.data.load` reads, plus ``ids``
        (the items' ids, for provenance). Items whose input is not an image in [0, 1] are left
        out and counted. Written atomically; an existing file is refused unless ``force``.
        """
        path = Path(path)
        if path.suffix != ".npz":
            raise InputError(f"out: the export is an .npz data set; name it *.npz, got {path}")
        if path.exists() and not force:
            raise InputError(f"out: {path} exists; pass --force (force=True) to replace it")
        check_writable(path, name="out")
        query = (
            sa.select(
                _items.c.id, _items.c.label, *[c for c in _items.c if c.name.startswith("input")]
            )
            .where(_items.c.status == "labelled")
            .order_by(_items.c.id)
        )
        xs, ys, ids, skipped = [], [], [], 0
        with self._engine.connect() as conn:
            for row in conn.execute(query):
                x = _decode_input(row._mapping)
                if (
                    not isinstance(x, np.ndarray)
                    or not np.isfinite(x).all()
                    or (x.size and (x.min() < 0 or x.max() > 1))
                ):
                    skipped += 1
                    continue
                xs.append(x)
                ys.append(row.label)
                ids.append(row.id)
        if not xs:
            raise InputError(
                f"export: no labelled images in {self.masked_url}; label some with "
                "`advx review label ID LABEL` or the review page first"
            )
        shapes = sorted({x.shape for x in xs})
        if len(shapes) > 1:
            raise InputError(
                f"export: the labelled items have different shapes {shapes[:3]}; a data set "
                "needs one shape"
            )
        with atomic_open(path, "wb") as f:
            np.savez(
                f,
                x=np.stack(xs).astype(np.float32),
                y=np.asarray(ys, dtype=np.int64),
                ids=np.asarray(ids, dtype=np.int64),
            )
        return {"path": str(path), "items": len(xs), "skipped": skipped, "shape": list(shapes[0])}

    # ---- settings -----------------------------------------------------------------------------
    def set_classes(self, classes: int) -> None:
        """Record the served model's number of classes (what a human label is checked against);
        for a service that learns it only after opening the store."""
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
            raise InputError(f"classes: expected an int >= 2, got {classes!r}")
        self._set_setting("classes", str(classes))
        self.classes = classes

    def _set_setting(self, key: str, value: str) -> None:
        with self._writer.begin() as conn:
            old = conn.execute(
                sa.select(_settings.c.value).where(_settings.c.key == key)
            ).scalar_one_or_none()
            if old is None:
                conn.execute(_settings.insert(), {"key": key, "value": value})
            elif old != value:
                log.info("store: %s was %s, now %s", key, old, value)
                conn.execute(_settings.update().where(_settings.c.key == key).values(value=value))

    def _classes_setting(self) -> int | None:
        with self._engine.connect() as conn:
            value = conn.execute(
                sa.select(_settings.c.value).where(_settings.c.key == "classes")
            ).scalar_one_or_none()
        return None if value is None else int(value)


# ---- engines ----------------------------------------------------------------------------------
def _parse_url(url: str | URL) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InputError(
            f"store: {str(url)[:80]!r} is not a database URL; expected e.g. "
            "sqlite:///path/to/guard.db or postgresql://user:password@host/db"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        # the psycopg (3) driver is the one advx[postgres] installs
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _engine(url: URL) -> Engine:
    kwargs: dict[str, Any] = {}
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            folder = Path(url.database).expanduser().parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise InputError(
                    f"store: cannot make the folder {folder} for {mask_url(url)}: {e.strerror}"
                ) from None
        else:
            # one connection for the whole process, or each would see its own empty database
            kwargs["poolclass"] = sa.pool.StaticPool
            kwargs["connect_args"] = {"check_same_thread": False}
    elif url.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": 10}
        kwargs["pool_pre_ping"] = True
    try:
        engine = sa.create_engine(url, **kwargs)
    except (NoSuchModuleError, ModuleNotFoundError) as e:
        hint = " (pip install 'advx[postgres]')" if "postgres" in url.drivername else ""
        raise InputError(f"store: no database driver for {mask_url(url)}: {e}{hint}") from None
    if engine.dialect.name == "sqlite":
        _sqlite_setup(engine)
    return engine


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:
        # let SQLAlchemy's begin event, not the sqlite3 module, decide when transactions start
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout = 30000")  # wait for the write lock, do not fail
        if engine.url.database and engine.url.database != ":memory:":
            cursor.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit is on disk when it returns (NORMAL could lose the newest on power loss)
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("advx_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _migrations() -> Path:
    return Path(str(resources.files(__package__) / "migrations"))


def _unreachable(url: URL, e: DBAPIError) -> InputError:
    reason = str(e.orig).strip().splitlines()[0] if e.orig is not None else str(e)
    if url.password:
        reason = reason.replace(str(url.password), "***")
    return InputError(f"store: cannot open the database {mask_url(url)}: {reason}")


# ---- rows -------------------------------------------------------------------------------------
def _row(item: Mapping[str, Any], i: int) -> dict[str, Any]:
    if not isinstance(item, Mapping):
        raise InputError(f"items[{i}]: expected a dict, got {type(item).__name__}")
    if "input" not in item:
        raise InputError(f"items[{i}]: has no 'input' (the input to keep for review)")
    data, dtype, shape = _encode_input(item["input"], item.get("shape"))
    probs = item.get("probs")
    return {
        "created": _when(item.get("time"), i),
        "client": str(item.get("client") or "")[:200],
        "request_id": None if item.get("request_id") is None else str(item["request_id"])[:200],
        "input": data,
        "input_dtype": dtype,
        "input_shape": json.dumps(shape),
        "input_sha256": sha256_bytes(data),
        "action": str(item.get("action") or "review")[:16],
        "answered": _opt_int(item.get("label")),
        "predicted": _opt_int(item.get("predicted")),
        "confidence": _opt_float(item.get("confidence")),
        "probs": None if probs is None else _dumps([float(p) for p in _flat(probs)]),
        "scores": _dumps(dict(item.get("scores") or {})),
        "reasons": _dumps(list(item.get("reasons") or [])),
        "model_version": str(item.get("model_version") or "")[:200],
        "policy_hash": str(item.get("policy_hash") or "")[:200],
        "status": "queued",
    }


def _encode_input(value: Any, shape: Any) -> tuple[bytes, str, list[int] | None]:
    """float32 bytes in C order with the shape; a row that is no array (ragged, text) as JSON:
    the queue keeps what the guard rejected too, exactly as it came."""
    if hasattr(value, "detach"):  # a tensor
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        return _dumps(value).encode(), "json", None
    if arr.dtype == object:
        return _dumps(value).encode(), "json", None
    arr = np.ascontiguousarray(arr)
    if shape is not None:
        try:
            want = [int(s) for s in shape]
        except (TypeError, ValueError):
            want = None
        if want is not None and math.prod(want) == arr.size:
            arr = arr.reshape(want)
    return arr.tobytes(), "float32", list(arr.shape)


def _decode_input(row: Mapping[Any, Any]) -> Any:
    data = bytes(row["input"])
    if sha256_bytes(data) != row["input_sha256"]:
        raise InputError(
            f"store: item {row.get('id', '?')}'s input does not match its sha256; the database "
            "was changed outside advx"
        )
    if row["input_dtype"] == "json":
        return json.loads(data)
    return np.frombuffer(data, dtype=np.float32).reshape(json.loads(row["input_shape"]))


def _summary(row: Mapping[Any, Any]) -> Item:
    return {
        "id": row["id"],
        "created": _iso(row["created"]),
        "status": row["status"],
        "client": row["client"],
        "request_id": row["request_id"],
        "action": row["action"],
        "answered": row["answered"],
        "predicted": row["predicted"],
        "confidence": row["confidence"],
        "probs": None if row["probs"] is None else json.loads(row["probs"]),
        "scores": json.loads(row["scores"]),
        "reasons": json.loads(row["reasons"]),
        "model_version": row["model_version"],
        "policy_hash": row["policy_hash"],
        "label": row["label"],
        "labelled_by": row["labelled_by"],
        "labelled_at": _iso(row["labelled_at"]),
        "input_shape": json.loads(row["input_shape"]),
        "input_sha256": row["input_sha256"],
    }


def _item_id(id: Any) -> int:
    if isinstance(id, bool) or not isinstance(id, (int, np.integer)) or id < 1:
        raise InputError(f"id: expected a review item's id (a positive int), got {id!r}")
    return int(id)


def _n_probs(probs: str | None) -> int | None:
    if probs is None:
        return None
    n = len(json.loads(probs))
    return n if n >= 2 else None


def _flat(values: Any) -> Iterable[Any]:
    if hasattr(values, "tolist"):
        values = values.tolist()
    if isinstance(values, Sequence) and not isinstance(values, (str, bytes)):
        for v in values:
            yield from _flat(v)
    else:
        yield values


def _opt_int(v: Any) -> int | None:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None


def _opt_float(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def _dumps(obj: Any) -> str:
    # NaN and inf survive (Python's JSON writes them); anything else unknown as its repr
    return json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else repr(o))


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _when(value: Any, i: int) -> dt.datetime:
    if value is None:
        return _utcnow()
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return dt.datetime.fromtimestamp(float(value), dt.timezone.utc)
    if isinstance(value, str):
        try:
            return _when(dt.datetime.fromisoformat(value.replace("Z", "+00:00")), i)
        except ValueError:
            pass
    raise InputError(
        f"items[{i}]: time must be epoch seconds, ISO 8601 or a datetime, got {value!r}"
    )


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands datetimes back naive; advx stores UTC
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).isoformat()
