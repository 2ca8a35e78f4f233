"""``--hf-dataset`` against the real ``datasets``, offline: local dataset folders loaded by
``datasets.load_dataset(FOLDER)`` (JSONL and Parquet files named by split) become tasks through
:func:`peftlab.data.hf_datasets.task_from_hf_dataset`: prompt/completion, text/label with a
``ClassLabel`` (ids become names, an unlabelled -1 row is counted) and chat rows; the eval split
is ``validation``, else ``test``, else a fraction of ``train``; and a dataset that is not there
and missing splits or columns are clear errors, without reaching the network.

It runs in a subprocess with HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1, and the datasets cache
under the test's folder (``datasets`` reads both when imported).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = r"""
import json, sys
from pathlib import Path
import datasets

root = Path(sys.argv[1])
# a GLUE-like classification set as Parquet: ClassLabel ids, an unlabelled (-1) validation row
features = datasets.Features(
    {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"]),
     "idx": datasets.Value("int32")}
)
def rows(prefix, n):
    return [{"sentence": f"{prefix} {'fine' if i % 2 else 'dull'} film {i}", "label": i % 2, "idx": i}
            for i in range(n)]
sst = root / "sst"
sst.mkdir()
datasets.Dataset.from_list(rows("t", 20), features=features).to_parquet(str(sst / "train.parquet"))
held = rows("v", 10) + [{"sentence": "v unknown", "label": -1, "idx": 99}]
datasets.Dataset.from_list(held, features=features).to_parquet(str(sst / "validation.parquet"))
datasets.Dataset.from_list(rows("x", 4), features=features).to_parquet(str(sst / "test.parquet"))

from peftlab.data.hf_datasets import task_from_hf_dataset

def summary(task):
    return {
        "kind": task.info["kind"], "labels": list(task.labels), "split": task.info["split"],
        "sizes": [len(task.train), len(task.eval)], "rows": task.info["rows"],
        "eval": [[ex.prompt, ex.completion, ex.text, ex.label, ex.messages] for ex in task.eval],
        "perfect": task.score([ex.completion for ex in task.eval]),
    }

found = {name: summary(task_from_hf_dataset(str(root / name), eval_fraction=0.25))
         for name in ("qa", "sst", "chat")}
for name in ("peftlab-tests/no-such-dataset", str(root / "eval-only"), str(root / "stars")):
    try:
        task_from_hf_dataset(name)
    except (RuntimeError, ValueError) as err:
        found[Path(name).name] = f"{type(err).__name__}: {err}"
print(json.dumps(found))
"""


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def found(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hf-datasets")
    _jsonl(
        root / "qa" / "train.jsonl",
        [{"prompt": f"Q: {i} + 1?", "completion": f" {i + 1}"} for i in range(12)],
    )
    _jsonl(
        root / "qa" / "test.jsonl", [{"prompt": f"Q: {i} + 2?", "completion": f" {i + 2}"} for i in range(3)]
    )
    chats = [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"say {i}"},
                      {"role": "assistant", "content": f"{i}"}]}
        for i in range(8)
    ]  # fmt: skip
    _jsonl(root / "chat" / "train.jsonl", chats)
    _jsonl(root / "eval-only" / "test.jsonl", [{"text": "a", "label": "x"}])
    _jsonl(root / "stars" / "train.jsonl", [{"body": "a", "stars": 5}])
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(root / "hf-home"),
        "HF_DATASETS_CACHE": str(root / "hf-cache"),
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(root)], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert (root / "hf-cache").is_dir()  # the datasets cache went where it was told, not to ~/.cache
    return result


def test_prompt_completion_folder_evaluates_on_its_test_split(found: dict[str, Any]) -> None:
    qa = found["qa"]
    assert qa["kind"] == "generation" and qa["labels"] == []
    assert qa["sizes"] == [12, 3] and qa["split"].startswith("eval from ") and qa["split"].endswith("[test]")
    assert [row[:2] for row in qa["eval"]] == [["Q: 0 + 2?", " 2"], ["Q: 1 + 2?", " 3"], ["Q: 2 + 2?", " 4"]]
    perfect = qa["perfect"]
    assert perfect["exact_match"] == 1.0 and perfect["rouge_l"] == 1.0 and "bleu" in perfect


def test_class_labels_become_names_and_validation_wins_over_test(found: dict[str, Any]) -> None:
    sst = found["sst"]
    assert sst["kind"] == "classification" and sst["labels"] == ["neg", "pos"]
    assert sst["split"].endswith("[validation]")  # validation is preferred to test
    assert sst["sizes"] == [20, 10]  # the unlabelled row is left out, and counted:
    (train_rows, held_rows) = sst["rows"]
    assert train_rows["skipped"] == 0 and (held_rows["rows_read"], held_rows["skipped"]) == (11, 1)
    assert "[validation] row 10: missing field 'label'" in held_rows["first_problems"][0]
    prompt, completion, text, label, _ = sst["eval"][1]
    assert (text, label, completion) == ("v fine film 1", "pos", " pos")
    assert prompt == "Text: v fine film 1\nLabel (neg / pos):"
    assert sst["perfect"]["accuracy"] == 1.0 and sst["perfect"]["macro_f1"] == 1.0


def test_chat_rows_without_an_eval_split_are_split_by_fraction(found: dict[str, Any]) -> None:
    chat = found["chat"]
    assert chat["kind"] == "chat" and chat["sizes"] == [6, 2]
    assert "25% held out" in chat["split"]
    for _, completion, _, _, messages in chat["eval"]:
        assert [role for role, _ in messages] == ["system", "user", "assistant"]
        assert messages[-1][1] == completion and messages[1][1] == f"say {completion}"


def test_errors_name_the_dataset_and_the_fix(found: dict[str, Any]) -> None:
    # not on the Hub and not cached: datasets' own error, wrapped, without reaching the network
    message = found["no-such-dataset"]
    assert message.startswith("RuntimeError: --hf-dataset peftlab-tests/no-such-dataset: could not load it (")
    assert "HF_DATASETS_OFFLINE=1" in message and "export the data to JSONL and pass --data" in message
    assert found["eval-only"].startswith("ValueError: --hf-dataset ")
    assert found["eval-only"].endswith("eval-only: no 'train' split (splits: test)")
    assert "columns body, stars are neither messages (chat), prompt/completion" in found["stars"]
