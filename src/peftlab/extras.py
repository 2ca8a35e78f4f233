"""Optional dependencies: the library core needs only torch, transformers, safetensors, numpy
and tqdm; each application's extra packages are an install extra, imported when first used.

| extra | packages | for |
|---|---|---|
| ``compare`` | optuna, sacrebleu, matplotlib | ``peftlab compare`` |
| ``gguf`` | gguf | ``.gguf`` models, including the embedded SmolLM2-135M |
| ``train`` | pyyaml, sacrebleu | ``peftlab train``: YAML run files, BLEU on generation data |
| ``serve`` | fastapi, uvicorn, prometheus-client | ``peftlab serve`` |
| ``hf`` | datasets | ``--hf-dataset`` |
| ``quant`` | bitsandbytes | ``--quantize`` / ``quantization=`` (a 4-bit or 8-bit frozen base) |
| ``tensorboard`` / ``mlflow`` / ``trackio`` | the library of that name | ``train --report-to`` |

(``compare`` uses its packages for the search, its store, the plots and BLEU. ``train`` is
all that ``peftlab train`` needs on data files of every kind, evaluation included: macro-F1 and
ROUGE-L are computed in :mod:`peftlab.data.metrics`, without scikit-learn or rouge-score; the
options above with extras of their own, and the embedded default model (``gguf``), add theirs.)
"""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> (PyPI package, extra)
PACKAGES: dict[str, tuple[str, str]] = {
    "optuna": ("optuna", "compare"),
    "sacrebleu": ("sacrebleu", "train"),  # also in compare; train is the smaller install
    "matplotlib": ("matplotlib", "compare"),
    "gguf": ("gguf", "gguf"),
    "yaml": ("pyyaml", "train"),
    "fastapi": ("fastapi", "serve"),
    "uvicorn": ("uvicorn", "serve"),
    "prometheus_client": ("prometheus-client", "serve"),
    "datasets": ("datasets", "hf"),
    "bitsandbytes": ("bitsandbytes", "quant"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}


class MissingExtra(RuntimeError):
    """An optional package a feature needs is not installed; the message names the install."""


def install_hint(module: str) -> str:
    package, extra = PACKAGES[module.split(".")[0]]
    return f"pip install 'peftlab[{extra}]' (or pip install {package})"


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (of a package in :data:`PACKAGES`), or raise :class:`MissingExtra`
    saying which ``pip install`` makes ``feature`` work."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if err.name is not None and err.name.split(".")[0] != top:
            raise  # the package is there but something it needs is broken: show that
        raise MissingExtra(
            f"{feature} needs the '{PACKAGES[top][0]}' package, which is not installed: {install_hint(top)}"
        ) from None
