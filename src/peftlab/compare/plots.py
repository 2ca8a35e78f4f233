"""The ``peftlab compare`` plots (matplotlib, the ``compare`` extra): quality (with 95% intervals;
hollow markers are methods statistically tied with the best) vs trainable parameters, training
cost, inference overhead, loss curves, the learning-rate search, quality against training
examples (``--sizes``) and quality against forgetting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftlab.extras import require


def write_plots(results: dict[str, Any], out: Path) -> list[str]:
    """PNG plots: quality vs trainable params, training cost, inference overhead, loss curves."""
    matplotlib = require("matplotlib", "peftlab compare's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10")(range(len(results["methods"])))
    written: list[str] = []
    plots = [
        ("quality_vs_params.png", _quality),
        ("cost.png", _cost),
        ("inference_overhead.png", _overhead),
        ("loss_curves.png", _losses),
    ]
    if any((r.get("search") or {}).get("trials") for r in results["methods"]):
        plots.append(("lr_search.png", _search))
    if results.get("curves"):
        plots.append(("data_size_curves.png", _curves))
    if any(r.get("forgetting") for r in results["methods"]):
        plots.append(("quality_vs_forgetting.png", _forgetting))
    for name, draw in plots:
        fig = draw(plt, results, colors)
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


def _quality(plt: Any, results: dict[str, Any], colors: Any) -> Any:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    best = results.get("best_method")
    for r, c in zip(results["methods"], colors, strict=True):
        x, q = r["trainable_params"], r["quality"]
        low, high = q.get("ci_low", q["mean"]), q.get("ci_high", q["mean"])
        tied = r.get("tied_with_best") and r["method"] != best
        face = "white" if tied else c
        ax.errorbar(x, q["mean"], yerr=[[q["mean"] - low], [high - q["mean"]]], fmt="o", color=c,
                    markerfacecolor=face, capsize=4, markersize=8, label=r["method"])  # fmt: skip
        note = " (best)" if r["method"] == best else " (tied)" if tied else ""
        ax.annotate(r["method"] + note, (x, q["mean"]), textcoords="offset points", xytext=(6, 6), fontsize=9)
    ax.axhline(results["zero_shot"]["quality"], color="grey", linestyle="--", label="zero-shot base")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"{results['task']['metric']} (held-out, 95% CI)")
    ax.set_title("Quality vs trainable parameters (hollow: tied with the best)")
    ax.legend(fontsize=8)
    return fig


def _cost(plt: Any, results: dict[str, Any], colors: Any) -> Any:
    rows = results["methods"]
    labels = [r["method"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.bar(labels, [r["median_step_s"] * 1000 for r in rows], color=colors)
    a1.set_ylabel("median train step (ms)")
    a1.set_title("Training step time")
    peaks = [(r["peak_memory_bytes"] or 0) / 1e9 for r in rows]
    a2.bar(labels, peaks, color=colors, label="measured peak RSS")
    estimates = [r["estimated_train_memory_bytes"]["total"] / 1e9 for r in rows]
    a2.scatter(labels, estimates, color="black", marker="_", s=400, label="estimate (peftlab count)")
    a2.set_ylabel("GB")
    a2.set_title("Peak memory during training")
    a2.legend(fontsize=8)
    for a in (a1, a2):
        a.tick_params(axis="x", rotation=30)
    return fig


def _overhead(plt: Any, results: dict[str, Any], colors: Any) -> Any:
    rows = results["methods"]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(rows))
    unmerged = [r["inference_overhead_unmerged"] for r in rows]
    merged = [r["inference_overhead_merged"] or 0 for r in rows]
    ax.bar([x - 0.2 for x in xs], unmerged, width=0.4, label="unmerged")
    ax.bar([x + 0.2 for x in xs], merged, width=0.4, label="merged")
    ax.axhline(1.0, color="grey", linestyle="--")
    ax.set_xticks(list(xs), [r["method"] for r in rows], rotation=30)
    ax.set_ylabel("forward latency / base")
    ax.set_title("Inference overhead vs base model (merged: n/a = 0)")
    ax.legend(fontsize=8)
    return fig


def _losses(plt: Any, results: dict[str, Any], colors: Any) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4))
    for r, c in zip(results["methods"], colors, strict=True):
        losses = r["runs"][0]["losses"]
        ax.plot(range(1, len(losses) + 1), losses, color=c, label=r["method"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("Loss curves (seed 0)")
    ax.legend(fontsize=8)
    return fig


def _search(plt: Any, results: dict[str, Any], colors: Any) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4))
    for r, c in zip(results["methods"], colors, strict=True):
        trials = [t for t in (r.get("search") or {}).get("trials", []) if t["val_loss"] is not None]
        if not trials:
            continue
        trials.sort(key=lambda t: t["learning_rate"])
        xs, ys = [t["learning_rate"] for t in trials], [t["val_loss"] for t in trials]
        ax.plot(xs, ys, "-", color=c, alpha=0.5)
        for t in trials:
            ax.plot(t["learning_rate"], t["val_loss"], "o" if t["state"] == "complete" else "x", color=c)
        chosen = r["learning_rate"]
        ax.plot(chosen, min(ys), "*", color=c, markersize=14, label=f"{r['method']}: {chosen:g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("best validation loss")
    ax.set_title("Learning-rate search (x: pruned; star: chosen)")
    ax.legend(fontsize=8)
    return fig


def _curves(plt: Any, results: dict[str, Any], colors: Any) -> Any:
    curves = results["curves"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    palette = plt.get_cmap("tab10")(range(len(curves["methods"])))
    for (method, points), c in zip(curves["methods"].items(), palette, strict=True):
        xs = [p["size"] for p in points]
        means = [p["quality"]["mean"] for p in points]
        lows = [p["quality"].get("ci_low", m) for p, m in zip(points, means, strict=True)]
        highs = [p["quality"].get("ci_high", m) for p, m in zip(points, means, strict=True)]
        ax.plot(xs, means, "o-", color=c, label=method)
        ax.fill_between(xs, lows, highs, color=c, alpha=0.15)
    ax.axhline(results["zero_shot"]["quality"], color="grey", linestyle="--", label="zero-shot base")
    ax.set_xscale("log")
    ax.set_xticks(curves["sizes"], [f"{n:,}" for n in curves["sizes"]])
    ax.set_xlabel("training examples (log scale)")
    ax.set_ylabel(f"{curves['metric']} (held-out, 95% CI band)")
    ax.set_title("Quality against training examples")
    ax.legend(fontsize=8)
    return fig


def _forgetting(plt: Any, results: dict[str, Any], colors: Any) -> Any:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r, c in zip(results["methods"], colors, strict=True):
        f, q = r.get("forgetting"), r["quality"]
        if not f:
            continue
        ax.errorbar(
            f["value"], q["mean"],
            xerr=[[f["value"] - f["ci_low"]], [f["ci_high"] - f["value"]]],
            yerr=[[q["mean"] - q.get("ci_low", q["mean"])], [q.get("ci_high", q["mean"]) - q["mean"]]],
            fmt="o", color=c, capsize=3, label=r["method"],
        )  # fmt: skip
        ax.annotate(
            r["method"], (f["value"], q["mean"]), textcoords="offset points", xytext=(6, 6), fontsize=9
        )
    ax.axvline(0.0, color="grey", linestyle=":")
    ax.axhline(results["zero_shot"]["quality"], color="grey", linestyle="--", label="zero-shot base")
    kind = (results.get("retain") or {}).get("kind")
    ax.set_xlabel(
        "forgetting: " + ("Δ loss on general text (nats/token)" if kind == "loss" else "embedding drift")
    )
    ax.set_ylabel(f"{results['task']['metric']} (held-out)")
    ax.set_title("Quality against what tuning cost the base (95% CIs)")
    ax.legend(fontsize=8)
    return fig
