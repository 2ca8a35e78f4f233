"""Where a comparison keeps its state: an Optuna storage (by default a SQLite file in the output
folder; ``--storage URL`` for any database Optuna supports, shared by workers on several
machines).

It holds, each written as soon as it exists (so a killed run loses at most the trial or final
run in progress):

- the settings that decide the results (a rerun with other settings is refused, naming them);
- per method, the learning-rate search (an Optuna study: its trials, intermediate validation
  losses and pruning decisions);
- per method and seed, the final run's record (scores per test example, measurements);
- per method, a claim: which worker (host and process) is running it, refreshed as it works,
  so that workers share the methods out and a dead worker's method is taken over.

Every one of these is an Optuna study named ``peftlab-compare:...`` (:data:`PREFIX`), so
``optuna-dashboard URL`` shows a comparison as it runs. Two environment variables tune the
claims:

- ``PEFTLAB_CLAIM_TIMEOUT_S`` (default 1800): how long a claim from another host may go without
  a heartbeat before another worker takes its method over. On the claim's own host a dead
  process is seen at once; another host's death only by this silence, so it must stay above
  the longest stretch between heartbeats (a search trial, a validation interval, a method's
  measurements);
- ``PEFTLAB_WORKER_HOST`` (default: the host name): the machine a worker's claims name.
  Machines that share one host name (containers started with the same ``--hostname``) each
  need their own, or one would judge the other's claims by its own process ids.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from peftlab.extras import require

PREFIX = "peftlab-compare"
CLAIM_TIMEOUT_S = 30 * 60
CLAIM_TIMEOUT_ENV = "PEFTLAB_CLAIM_TIMEOUT_S"
WORKER_HOST_ENV = "PEFTLAB_WORKER_HOST"
# the package that provides each database driver SQLAlchemy imports by default
DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient"}


def default_storage(out: str | Path) -> str:
    return f"sqlite:///{Path(out).resolve() / 'compare.db'}"


def optuna_module() -> Any:
    """Optuna (the ``compare`` extra), quiet."""
    optuna = require("optuna", "peftlab compare's learning-rate search")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def claim_timeout_s() -> float:
    """Seconds without a heartbeat after which another host's claim is taken over
    (``PEFTLAB_CLAIM_TIMEOUT_S``, see the module docstring)."""
    value = os.environ.get(CLAIM_TIMEOUT_ENV, "").strip()
    if not value:
        return CLAIM_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise ValueError(f"{CLAIM_TIMEOUT_ENV}={value!r}: expected a number of seconds > 0")
    return seconds


def worker_host() -> str:
    """The machine this worker's claims name (``PEFTLAB_WORKER_HOST``, else the host name)."""
    return os.environ.get(WORKER_HOST_ENV, "").strip() or socket.gethostname()


def shown_url(url: str) -> str:
    """``url`` as messages show it: its password hidden."""
    from sqlalchemy.engine import make_url

    try:
        return str(make_url(url).render_as_string(hide_password=True))
    except Exception:  # not a URL at all: shown as given, it holds no parsed password
        return url


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:`` URL (None for other databases and in-memory SQLite)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).resolve()


def _open_storage(optuna: Any, url: str, kwargs: dict[str, Any], attempts: int = 5) -> Any:
    """Optuna's RDBStorage; two processes creating the same new database at once can collide on
    its schema tables (for the loser an IntegrityError, or on PostgreSQL "relation ... already
    exists", a ProgrammingError), so that is tried again."""
    import sqlalchemy.exc

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's experimental-feature notices
                return optuna.storages.RDBStorage(url, **kwargs)
        except (
            sqlalchemy.exc.IntegrityError,
            sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.ProgrammingError,
        ):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _check_database(url: str, engine_kwargs: dict[str, Any]) -> None:
    """Connect once before Optuna does, so that a URL of no known database, a missing driver, a
    server out of reach and a damaged SQLite file each stop with their own one-line error
    (Optuna would retry, then print the SQL it had tried)."""
    import sqlalchemy

    path = sqlite_path(url)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(
                f"--storage {shown_url(url)!r}: cannot create {path} ({err.strerror or err}); give a "
                "file in a folder this user can write to"
            ) from None
    try:
        engine = sqlalchemy.create_engine(url, **engine_kwargs)
    except ImportError as err:
        raise _missing_driver(url, err) from None
    except Exception as err:  # not a URL, or one of a database SQLAlchemy does not know
        raise _cannot_open(url, err) from None
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":  # a file cut short or overwritten: fails here
                problems = [str(row[0]) for row in conn.exec_driver_sql("PRAGMA quick_check")]
                if problems != ["ok"]:
                    raise _damaged(url, problems[0])
    except sqlalchemy.exc.DBAPIError as err:
        raise _connect_error(url, err) from None
    finally:
        engine.dispose()


def _driver_message(err: BaseException) -> str:
    """The first line of the driver's own words (the rest is SQLAlchemy's SQL and links, or
    hints that the advice after it gives)."""
    orig = getattr(err, "orig", None) or err
    lines = [" ".join(line.split()) for line in str(orig).splitlines() if line.strip()]
    return lines[0] if lines else type(orig).__name__


def _missing_driver(url: str, err: ImportError) -> ValueError:
    """The driver SQLAlchemy imports for this kind of URL is not installed: name its package."""
    package = DRIVER_PACKAGES.get(err.name or "", err.name or "its driver")
    return ValueError(
        f"--storage {shown_url(url)!r}: the database driver it needs is not installed ({err}); "
        f"pip install '{package}' on every machine that runs a worker"
    )


def _connect_error(url: str, err: BaseException) -> ValueError:
    """A server out of reach, refused credentials, or a SQLite file that cannot be opened or
    read (damaged: it is not, or no longer, a whole database)."""
    import sqlalchemy.exc

    path = sqlite_path(url)
    corrupt = isinstance(err, sqlalchemy.exc.DatabaseError) and not isinstance(
        err, sqlalchemy.exc.OperationalError
    )
    if path is not None and corrupt:
        return _damaged(url, _driver_message(err))
    if path is not None:
        return ValueError(
            f"--storage {shown_url(url)!r}: cannot open {path} ({_driver_message(err)}); give a file "
            "in a folder this user can write to"
        )
    return ValueError(
        f"--storage {shown_url(url)!r}: cannot connect ({_driver_message(err)}); start the database "
        "server or correct its host, port, user, password or database name in the URL (every "
        "worker's machine must reach it)"
    )


def _damaged(url: str, problem: str) -> ValueError:
    """A SQLite file that is no (longer a) whole database: a copy cut short, a disk that filled
    up. Nothing in it can be trusted, so the way on is a new file; the old one is kept aside."""
    path = sqlite_path(url) or Path(url)
    return ValueError(
        f"the comparison's store {path} is damaged ({problem}), so what it held cannot be read; move "
        f"it aside (mv {path} {path}.damaged) and run again, which starts this comparison afresh"
    )


def _cannot_open(url: str, err: BaseException) -> ValueError:
    """Anything else: not a URL, or of a database Optuna cannot use."""
    return ValueError(
        f"--storage {shown_url(url)!r}: cannot open it ({type(err).__name__}: {_driver_message(err)}); "
        "give a database URL Optuna supports, e.g. sqlite:///compare.db or postgresql://user@host/db"
    )


class Store:
    """The comparison's state in one Optuna storage (see the module docstring)."""

    def __init__(self, url: str) -> None:
        optuna = optuna_module()
        self.url = url
        self.claim_timeout_s = claim_timeout_s()
        # several local workers write to one SQLite file: wait for its lock instead of failing
        engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite:") else {}
        _check_database(url, engine_kwargs)
        try:
            self.storage = _open_storage(optuna, url, {"engine_kwargs": engine_kwargs})
        except Exception as err:  # SQLAlchemy and Optuna raise many types
            raise _cannot_open(url, err) from None

    # ---- studies ---------------------------------------------------------------------------
    def study(self, name: str, *, create: bool = True, pruner: Any = None) -> Any:
        optuna = optuna_module()
        full = f"{PREFIX}:{name}"
        if create:
            return optuna.create_study(
                study_name=full,
                storage=self.storage,
                direction="minimize",
                load_if_exists=True,
                pruner=pruner,
            )
        return optuna.load_study(study_name=full, storage=self.storage, pruner=pruner)

    def _exists(self, name: str) -> bool:
        full = f"{PREFIX}:{name}"
        return any(s.study_name == full for s in self.storage.get_all_studies())

    def _attrs(self, name: str) -> dict[str, Any]:
        study_id = self.storage.get_study_id_from_name(f"{PREFIX}:{name}")
        return dict(self.storage.get_study_user_attrs(study_id))

    def _set_attr(self, name: str, key: str, value: Any) -> None:
        study_id = self.storage.get_study_id_from_name(f"{PREFIX}:{name}")
        self.storage.set_study_user_attr(study_id, key, value)

    # ---- settings --------------------------------------------------------------------------
    def check_settings(self, settings: dict[str, Any]) -> None:
        """Record the settings on first use; refuse others later, naming each difference."""
        self.study("settings")
        saved = self._attrs("settings").get("settings")
        if saved is None:
            self._set_attr("settings", "settings", settings)
            self._set_attr("settings", "started", time.time())
            saved = self._attrs("settings")["settings"]
        current = json.loads(json.dumps(settings))
        keys = sorted(set(saved) | set(current))
        diffs = [
            f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)
        ]
        if diffs:
            raise ValueError(
                f"this comparison ({shown_url(self.url)}) was started with other settings "
                f"({'; '.join(diffs)}); its finished trials and runs would not match. Rerun with the "
                "settings it was started with, or use a new --out (or --storage)"
            )

    def started(self) -> float:
        """When the comparison was first started (the first worker's clock)."""
        return float(self._attrs("settings").get("started", time.time()))

    # ---- claims ----------------------------------------------------------------------------
    def claim(self, unit: str) -> bool:
        """Take ``unit`` for this process; False when another live worker has it or it is done."""
        optuna = optuna_module()
        name = f"claim:{unit}"
        for _ in range(3):
            try:
                optuna.create_study(study_name=f"{PREFIX}:{name}", storage=self.storage, load_if_exists=False)
            except optuna.exceptions.DuplicatedStudyError:
                attrs = self._attrs(name)
                if attrs.get("done"):
                    return False
                if attrs.get("host") == worker_host() and attrs.get("pid") == os.getpid():
                    return True  # our own claim (a second pass of the work loop)
                if not _stale(attrs, self.claim_timeout_s):
                    return False
                optuna.delete_study(study_name=f"{PREFIX}:{name}", storage=self.storage)
                continue
            # "host" last: a claim with a host has its pid too (see _stale)
            for key, value in sorted(_owner().items(), key=lambda item: item[0] == "host"):
                self._set_attr(name, key, value)
            return True
        return False

    def heartbeat(self, unit: str) -> None:
        self._set_attr(f"claim:{unit}", "heartbeat", time.time())

    def finish(self, unit: str) -> None:
        self._set_attr(f"claim:{unit}", "done", True)

    def is_done(self, unit: str) -> bool:
        name = f"claim:{unit}"
        return self._exists(name) and bool(self._attrs(name).get("done"))

    # ---- final runs ------------------------------------------------------------------------
    def put_record(self, method: str, seed: int, record: dict[str, Any]) -> None:
        self.study(f"runs:{method}")
        self._set_attr(f"runs:{method}", f"seed-{seed}", json.loads(json.dumps(record, default=str)))

    def get_record(self, method: str, seed: int) -> dict[str, Any] | None:
        if not self._exists(f"runs:{method}"):
            return None
        value = self._attrs(f"runs:{method}").get(f"seed-{seed}")
        return value if isinstance(value, dict) else None


def _owner() -> dict[str, Any]:
    now = time.time()
    return {"host": worker_host(), "pid": os.getpid(), "started": now, "heartbeat": now}


def _stale(attrs: dict[str, Any], timeout_s: float) -> bool:
    """A claim whose worker is gone: a dead process on this host, or no heartbeat from another
    host for ``timeout_s`` seconds."""
    if "host" not in attrs:
        return False  # being set up by its creator this very moment
    if attrs["host"] == worker_host():
        return not _alive(int(attrs["pid"]))
    return time.time() - float(attrs.get("heartbeat", 0)) > timeout_s


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
