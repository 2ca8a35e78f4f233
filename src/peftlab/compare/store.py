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
# a claim not refreshed for this long belongs to a worker that is gone (other hosts; on this
# host a dead process is seen at once)
CLAIM_TIMEOUT_S = 30 * 60


def default_storage(out: str | Path) -> str:
    return f"sqlite:///{Path(out).resolve() / 'compare.db'}"


def optuna_module() -> Any:
    """Optuna (the ``compare`` extra), quiet."""
    optuna = require("optuna", "peftlab compare's learning-rate search")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _open_storage(optuna: Any, url: str, kwargs: dict[str, Any], attempts: int = 5) -> Any:
    """Optuna's RDBStorage; two processes creating the same new database at once can collide on
    its schema tables (an IntegrityError for the loser), so that is tried again."""
    import sqlalchemy.exc

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's experimental-feature notices
                return optuna.storages.RDBStorage(url, **kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


class Store:
    """The comparison's state in one Optuna storage (see the module docstring)."""

    def __init__(self, url: str) -> None:
        optuna = optuna_module()
        self.url = url
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite:"):
            path = url.removeprefix("sqlite:///")
            if path and not path.startswith(":memory:"):
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            # several local workers write to one file: wait for the lock instead of failing
            kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
        try:
            self.storage = _open_storage(optuna, url, kwargs)
        except Exception as err:  # SQLAlchemy and Optuna raise many types for a bad URL
            raise ValueError(
                f"--storage {url!r}: cannot open it ({type(err).__name__}: {err}); give a database URL "
                "Optuna supports, e.g. sqlite:///compare.db or postgresql://user@host/db"
            ) from None

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
                f"this comparison ({self.url}) was started with other settings ({'; '.join(diffs)}); its "
                "finished trials and runs would not match. Rerun with the settings it was started with, or "
                "use a new --out (or --storage)"
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
                if attrs.get("host") == socket.gethostname() and attrs.get("pid") == os.getpid():
                    return True  # our own claim (a second pass of the work loop)
                if not _stale(attrs):
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
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now}


def _stale(attrs: dict[str, Any]) -> bool:
    """A claim whose worker is gone: a dead process on this host, or no heartbeat for long."""
    if "host" not in attrs:
        return False  # being set up by its creator this very moment
    if attrs["host"] == socket.gethostname():
        return not _alive(int(attrs["pid"]))
    return time.time() - float(attrs.get("heartbeat", 0)) > CLAIM_TIMEOUT_S


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
