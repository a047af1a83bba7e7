"""A real PostgreSQL server for tests: initdb + postgres in a temporary folder on a free port.

The server binaries are found in ``$ADVX_PG_BIN``, else the newest
``/usr/lib/postgresql/<version>/bin`` (Debian's ``postgresql`` package), else ``pg_config
--bindir``, else on ``PATH``. PostgreSQL refuses to run as root: when the tests run as root, the
server runs as the ``postgres`` user (which Debian's package creates). Only a missing binary (or
no ``postgres`` user to run it as root) skips, with the reason, and not even that where
``ADVX_REQUIRE_SERVERS=1`` (CI); a server that is there and does not start fails the test.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._server import free_port


def skip_or_fail(reason: str) -> None:
    """Skip with the reason, unless ADVX_REQUIRE_SERVERS=1 (CI sets it): there a missing
    server is a failure, not a skip."""
    if os.environ.get("ADVX_REQUIRE_SERVERS") == "1":
        pytest.fail(f"{reason} (ADVX_REQUIRE_SERVERS=1: CI must run this test)")
    pytest.skip(reason)


def pg_bin() -> Path | None:
    """The folder holding initdb and postgres, or None."""
    env = os.environ.get("ADVX_PG_BIN")
    candidates = [Path(env)] if env else []
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).parent)  # type: ignore[arg-type]
    for path in candidates:
        if (path / "initdb").exists() and (path / "postgres").exists():
            return path
    return None


@contextlib.contextmanager
def postgres_server(*, dbname: str = "advx") -> Iterator[str]:
    """Start a throw-away PostgreSQL server; yields a ``postgresql://`` URL to ``dbname``."""
    bindir = pg_bin()
    if bindir is None:
        skip_or_fail(
            "PostgreSQL server binaries not found (install Debian's postgresql package or set "
            "ADVX_PG_BIN to the folder holding initdb and postgres)"
        )
    run_as: dict = {}
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            skip_or_fail("running as root and there is no 'postgres' user to run PostgreSQL as")
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    root = Path(tempfile.mkdtemp(prefix="advx-pg-"))
    if run_as:
        os.chown(root, run_as["user"], run_as["group"])
    data, log = root / "data", root / "server.log"
    port = free_port()
    try:
        subprocess.run(
            [bindir / "initdb", "-D", data, "-U", "advx", "-A", "trust", "--no-sync", "-E", "UTF8"],
            check=True,
            capture_output=True,
            **run_as,
        )
        subprocess.run(
            [
                bindir / "pg_ctl",
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                data,
                "-l",
                log,
                "-o",
                f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
            ],
            check=True,
            capture_output=True,
            **run_as,
        )
    except subprocess.CalledProcessError as e:
        tail = log.read_text()[-2000:] if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(
            f"PostgreSQL did not start: {e.cmd[:2]} -> {e.returncode}\n{e.stderr}\n{tail}"
        ) from None
    try:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=port, user="advx", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"')
        yield f"postgresql://advx@127.0.0.1:{port}/{dbname}"
    finally:
        subprocess.run(
            [bindir / "pg_ctl", "stop", "-D", data, "-m", "fast", "-w"],
            capture_output=True,
            **run_as,
        )
        time.sleep(0.05)
        shutil.rmtree(root, ignore_errors=True)
