"""LoRA: low-rank updates to frozen linear layers (Hu et al., 2021, arXiv:2106.09685).

For a frozen weight W (out x in) LoRA learns A (r x in) and B (out x r) and computes

    y = W x + s * B A dropout(x),     s = lora_alpha / r   (rsLoRA: lora_alpha / sqrt(r))

B starts at zero so the adapted model starts equal to the base. Merging adds s * B A to W;
unmerging subtracts it.

Weighted combination (``add_weighted_adapter``; adapter ``i``: ``A_i`` (r_i x in), ``B_i``
(out x r_i), scaling ``s_i``; the new adapter has ``lora_alpha = r``, so its own scaling is 1
and its delta is ``B A``):

- ``"cat"``: ``A = [w_1 s_1 A_1; ...; w_n s_n A_n]``, ``B = [B_1 ... B_n]``, rank ``sum r_i``.
  Exact: ``B A = sum_i w_i s_i B_i A_i``. Same parameters as HF PEFT's ``"cat"``.
- ``"svd"``: per module the best rank-``k`` approximation (Eckart-Young) of that exact sum,
  ``B = U_k S_k``, ``A = V_k^T``; ``k = svd_rank`` (default: the largest ``r_i``). The SVD is
  taken of the small factor matrices (QR of the concatenated ``B`` and ``A``), never of the
  dense out x in delta. Where a module's delta has fewer than ``k`` singular values the
  remaining rank is zero. Same delta as HF PEFT's ``"svd"``.
- ``"linear"``: HF PEFT's rule, for adapters of one rank ``r``:
  ``A = sum_i sign(w_i) sqrt(|w_i| s_i) A_i``, ``B = sum_i sqrt(|w_i| s_i) B_i``, rank ``r``.
  ``A`` and ``B`` are combined separately, so ``B A`` holds cross terms ``B_i A_j``: it equals
  the weighted delta sum only for one adapter. Cheap and approximate; prefer ``"cat"``/``"svd"``.
- ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"`` (HF PEFT's, inputs of one
  rank): ``"linear"`` with a pruning rule (``combination.merge_tensors``; ``density`` required)
  applied to the A's (weights ``sign(w_i s_i) sqrt(|w_i s_i|)``) and then to the B's (weights
  ``sqrt(|w_i s_i|)``) separately, rank ``r``.
- ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``, ``"magnitude_prune_svd"``: the rule
  applied to the dense deltas ``s_i B_i A_i`` with weights ``w_i``, then ``"svd"``'s factors of
  the result, computed from the dense matrix (rank ``svd_rank``, default the largest ``r_i``).
  ``svd_clamp`` (these and ``"svd"``) clamps both factors to a quantile of their entries;
  ``svd_full_matrices`` and ``svd_driver`` (CUDA only) select how torch computes the SVD.

DARE's random masks come from torch's global RNG in HF PEFT's order (after the new adapter's
initialisation; per module in model order, each input's A then each input's B, or each input's
delta), in the adapters' dtype and the weight's layout, so a seed gives PEFT's result.

A module that only some inputs adapt takes only their terms (the others contribute zero); the
new adapter targets the union of the inputs' modules. LoRA's trainable biases are the base
model's own, so nothing is combined and the new adapter has ``bias="none"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.core import combination
from peftlab.core.combination import Computed, Inputs, Values
from peftlab.core.config import (
    PeftConfig,
    TaskType,
    check_module_names,
    check_positive_int,
    check_probability,
    normalize_targets,
)
from peftlab.core.host import AdapterHost
from peftlab.core.injection import exact_suffixes
from peftlab.core.layers import AdapterUnit, Stage, base_weight, is_conv1d, linear_features
from peftlab.core.method import Method, Targets, architecture_of, resolve_targets
from peftlab.core.quantized import unit_placement

BIAS_MODES = ("none", "all", "lora_only")
# combination types that prune / elect signs on A and B separately (as "linear" combines them)
FACTOR_RULES = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
# combination types that take an SVD of the combined delta; "<rule>_svd" applies <rule> to the deltas
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
SVD_DRIVERS = ("gesvd", "gesvdj", "gesvda")
# target_modules=None: the query and value projections (Hu et al.)
DEFAULT_TARGETS: dict[str, Targets] = {
    "llama": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "t5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
}


@dataclass
class LoraConfig(PeftConfig):
    """Configuration of a LoRA adapter; field names and meanings follow HF PEFT."""

    peft_type: ClassVar[str] = "LORA"
    PEFT_DEFAULTS: ClassVar[dict[str, Any]] = {
        "exclude_modules": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "trainable_token_indices": None,
        "loftq_config": {},
        "eva_config": None,
        "corda_config": None,
        "lora_ga_config": None,
        "use_dora": False,
        "velora_config": None,
        "alora_invocation_tokens": None,
        "use_qalora": False,
        "qalora_group_size": 16,
        "monteclora_config": None,
        "layer_replication": None,
        "lora_bias": False,
        "target_parameters": None,
        "use_bdlora": None,
        "arrow_config": None,
        "kasa_config": None,
        "ensure_weight_tying": False,
    }

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    task_type: TaskType | str | None = None
    # PEFT's flag for GPT-2's Conv1D layout; peftlab detects the layout itself, so the value
    # is only carried through to the saved config for PEFT's benefit
    fan_in_fan_out: bool = field(default=False, repr=False)

    def validate(self) -> None:
        check_positive_int("r", self.r)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise ValueError(f"lora_alpha: must be a number, got {self.lora_alpha!r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha: must be > 0, got {self.lora_alpha!r}")
        check_probability("lora_dropout", self.lora_dropout)
        self.target_modules = normalize_targets("target_modules", self.target_modules)
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias: {self.bias!r} is not one of {', '.join(BIAS_MODES)}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora: must be True or False, got {self.use_rslora!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"init_lora_weights: {self.init_lora_weights!r} is not supported; use True "
                "(Kaiming A, zero B), 'gaussian' (normal A, zero B) or False (random A and B)"
            )
        self.modules_to_save = check_module_names("modules_to_save", self.modules_to_save)
        self.layers_to_transform = _check_layers(self.layers_to_transform)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _check_layers(value: Any) -> list[int] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
    ):
        raise ValueError(f"layers_to_transform: must be layer indices >= 0, got {value!r}")
    return list(items)


class LoraUnit(AdapterUnit):
    """``lora_A`` / ``lora_B`` for one wrapped layer (names match HF PEFT's state-dict keys)."""

    stage = "delta"
    mergeable = True

    def __init__(self, base_layer: nn.Module, config: LoraConfig) -> None:
        super().__init__()
        in_features, out_features = linear_features(base_layer)
        weight = base_weight(base_layer)
        kw = unit_placement(base_layer, weight)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.lora_A = nn.Linear(in_features, config.r, bias=False, **kw)
        self.lora_B = nn.Linear(config.r, out_features, bias=False, **kw)
        self.lora_dropout: nn.Module = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        self.scaling = config.scaling
        self.reset_parameters(config.init_lora_weights, config.r)

    def reset_parameters(self, init: bool | str, r: int) -> None:
        if init is False:
            return  # nn.Linear's own random init for both A and B: for tests
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A.weight
        # scale the r-wide intermediate rather than the out-wide result: fewer multiplies
        return self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype))) * self.scaling)

    @classmethod
    def routed(
        cls,
        stage: Stage,
        per_group: Sequence[Sequence[AdapterUnit]],
        index: torch.Tensor,
        t: torch.Tensor,
        cache: dict[Any, Any],
    ) -> torch.Tensor | None:
        """Per-sample LoRA in two batched products (as Punica / S-LoRA do): each group's A's
        stacked along the rank (a Stack's deltas add) and zero-padded to a common rank R,
        gathered per sample, ``x (b, L, in) @ A_i^T (b, in, R) @ (s B_i)^T (b, R, out)``."""
        units = [u for group in per_group for u in group]
        assert all(isinstance(u, LoraUnit) for u in units)
        lora = [[u for u in group if isinstance(u, LoraUnit)] for group in per_group]
        if any(u.training and not isinstance(u.lora_dropout, nn.Identity) for g in lora for u in g):
            # dropout masks are drawn per adapter; keep that exact by running groups apart
            return super().routed(stage, per_group, index, t, cache)
        # without autograd the gathered weights serve every decoding step of the call
        reuse = not torch.is_grad_enabled()
        key = ("gathered", index.shape[0], index.device)
        gathered = cache.get(key) if reuse else None
        if gathered is None:
            stacked = _stacked(lora)
            if stacked is None:
                return None
            a, b = stacked
            gathered = (a[index].transpose(1, 2), b[index].transpose(1, 2))
            if reuse:
                cache[key] = gathered
        a_t, b_t = gathered
        x = t.reshape(t.shape[0], -1, t.shape[-1]).to(a_t.dtype)
        out = torch.bmm(torch.bmm(x, a_t), b_t)
        return out.reshape(*t.shape[:-1], out.shape[-1])

    def delta_weight(self) -> torch.Tensor:
        """s * B A in the (out, in) layout of nn.Linear."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def _layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T if self.fan_in_fan_out else delta

    def merged_weights(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = base_weight(base_layer)
        return w + self._layout(self.delta_weight()).to(w.dtype), None

    def unmerged_weights(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = base_weight(base_layer)
        return w - self._layout(self.delta_weight()).to(w.dtype), None


def _stacked(groups: list[list[LoraUnit]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A (G, R, in), s*B (G, out, R)) per group, zero-padded to the largest summed rank R."""
    ranks = [sum(u.lora_A.weight.shape[0] for u in g) for g in groups]
    width = max(ranks)
    if width == 0:
        return None
    first = next(u for g in groups for u in g)
    a_ref, b_ref = first.lora_A.weight, first.lora_B.weight
    a_rows, b_cols = [], []
    for group, rank in zip(groups, ranks, strict=True):
        a_parts = [u.lora_A.weight for u in group]
        b_parts = [u.lora_B.weight * u.scaling for u in group]
        if rank < width:
            a_parts.append(a_ref.new_zeros(width - rank, a_ref.shape[1]))
            b_parts.append(b_ref.new_zeros(b_ref.shape[0], width - rank))
        a_rows.append(torch.cat(a_parts, 0))
        b_cols.append(torch.cat(b_parts, 1))
    return torch.stack(a_rows), torch.stack(b_cols)


class LoraMethod(Method):
    peft_type = "LORA"
    config_class = LoraConfig
    name = "LoRA"
    mergeable = True
    combination_types = ("linear", "cat", *FACTOR_RULES, *SVD_TYPES)
    combination_options: ClassVar[dict[str, tuple[str, ...]]] = {
        "svd_rank": SVD_TYPES,
        "svd_clamp": SVD_TYPES,
        "svd_full_matrices": SVD_TYPES,
        "svd_driver": SVD_TYPES,
        "density": (*FACTOR_RULES, *SVD_TYPES[1:]),
        "majority_sign_method": tuple(t for t in (*FACTOR_RULES, *SVD_TYPES) if "ties" in t),
    }

    def targets(self, model: nn.Module, config: LoraConfig) -> dict[str, Any]:
        names = resolve_targets(
            model,
            config.target_modules,
            DEFAULT_TARGETS.get(architecture_of(model) or ""),
            method="LoRA",
            layers_to_transform=config.layers_to_transform,  # type: ignore[arg-type]
        )
        return {name: None for name in names}

    def make_unit(self, base_layer: nn.Module, config: LoraConfig, role: Any) -> AdapterUnit:
        linear_features(base_layer)  # clear error for non-linear targets
        return LoraUnit(base_layer, config)

    def combine(
        self, host: AdapterHost, inputs: Inputs, adapter_name: str, combination_type: str, **options: Any
    ) -> tuple[PeftConfig, Computed]:
        """See the module docstring for what each ``combination_type`` computes."""
        configs = [host.peft_config[n] for n, _ in inputs]
        assert all(isinstance(c, LoraConfig) for c in configs)
        ranks = [c.r for c in configs]  # type: ignore[attr-defined]
        rule = _check_rule_options(combination_type, options)
        svd_rank = options.get("svd_rank")
        if combination_type in ("linear", *FACTOR_RULES):
            if len(set(ranks)) > 1:
                listed = ", ".join(f"r={r} ({n!r})" for (n, _), r in zip(inputs, ranks, strict=True))
                alternatives = (
                    f"'cat' (exact, rank {sum(ranks)}) or 'svd' (a rank-{max(ranks)} approximation)"
                    if combination_type == "linear"
                    else f"'{combination_type}_svd' (on the deltas, rank {max(ranks)})"
                )
                raise ValueError(
                    f"combination_type={combination_type!r} needs adapters of one rank, got {listed}; "
                    f"use {alternatives} instead"
                )
            rank = ranks[0]
        elif combination_type == "cat":
            rank = sum(ranks)
        else:
            rank = svd_rank if svd_rank is not None else max(ranks)

        per_module = combination.units_by_module(host, inputs)

        def compute() -> Values:
            """Run once the new adapter exists (see ``combination.Computed``): DARE's draws follow its
            units' initialisation, module by module in model order, as HF PEFT's do."""
            values: Values = {}
            for module_name, units in per_module.items():
                terms = [(u, w) for u, w in units if isinstance(u, LoraUnit)]
                if combination_type == "linear":
                    a, b = _lora_linear(terms)
                elif combination_type in FACTOR_RULES:
                    a, b = _lora_factor_rule(terms, combination_type, options)
                elif combination_type == "cat" or (combination_type == "svd" and "svd_clamp" not in options):
                    a, b = _lora_concat(terms)
                    if combination_type == "svd":
                        a, b = _truncated_svd(a, b, rank)
                else:
                    delta = _lora_delta_rule(terms, rule, options)
                    a, b = _delta_svd(delta, rank, options, terms[0][0])
                if combination_type not in ("linear", *FACTOR_RULES):
                    a, b = _pad_rank(a, b, rank)
                values[combination.unit_path(module_name, adapter_name, "lora_A.weight")] = a
                values[combination.unit_path(module_name, adapter_name, "lora_B.weight")] = b
            return values

        first = configs[0]
        assert isinstance(first, LoraConfig)
        base = LoraConfig(
            r=rank,
            lora_alpha=rank,  # scaling 1: the weights and scalings are folded into A and B
            lora_dropout=first.lora_dropout,
            target_modules=first.target_modules,
            layers_to_transform=first.layers_to_transform,
            task_type=_common_task_type(host, [n for n, _ in inputs]),
            fan_in_fan_out=first.fan_in_fan_out,
            init_lora_weights=first.init_lora_weights,  # the same draws as HF PEFT's new adapter
        )
        return self._union_targets(host, base, configs, set(per_module)), compute

    def _union_targets(
        self, host: AdapterHost, base: LoraConfig, configs: list[PeftConfig], modules: set[str]
    ) -> LoraConfig:
        """``base`` targeting exactly ``modules``: the inputs' own target spec when they share one,
        else the shortest module-name suffixes that select the union (as checkpoints write them)."""
        specs = {(repr(c.target_modules), repr(c.layers_to_transform)) for c in configs}  # type: ignore[attr-defined]
        if len(specs) == 1 and self._selects(host, base, modules):
            return base
        union = combination.copy_config(
            base, target_modules=exact_suffixes(host.base_model, modules), layers_to_transform=None
        )
        assert isinstance(union, LoraConfig)
        if not self._selects(host, union, modules):
            raise RuntimeError(f"internal error: no target_modules selects exactly {sorted(modules)[:3]}...")
        return union

    def _selects(self, host: AdapterHost, config: LoraConfig, modules: set[str]) -> bool:
        try:
            return set(self.targets(host.base_model, config)) == modules
        except ValueError:
            return False


def _lora_concat(terms: list[tuple[LoraUnit, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) stacked along the rank, each A scaled by its ``w_i s_i``: B A is the exact sum."""
    a = torch.cat([combination.wide(u.lora_A.weight) * (w * u.scaling) for u, w in terms], 0)
    b = torch.cat([combination.wide(u.lora_B.weight) for u, _ in terms], 1)
    return a, b


def _lora_linear(terms: list[tuple[LoraUnit, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """HF PEFT's "linear": A and B summed separately, each with sqrt(|w_i| s_i), the sign on A."""
    a = b = None
    for u, w in terms:
        root = math.sqrt(abs(w) * u.scaling)
        term_a = math.copysign(root, w) * combination.wide(u.lora_A.weight)
        term_b = root * combination.wide(u.lora_B.weight)
        a = term_a if a is None else a + term_a
        b = term_b if b is None else b + term_b
    assert a is not None and b is not None
    return a, b


def _check_rule_options(combination_type: str, options: dict[str, Any]) -> str:
    """Check the options of ``combination_type`` (filling in ``density`` / ``majority_sign_method``
    where the type needs them) and return the rule it applies (a key of ``combination.PRUNING``)."""
    svd_rank = options.get("svd_rank")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank: must be a positive integer (the new adapter's rank), got {svd_rank!r}")
    clamp = options.get("svd_clamp")
    if clamp is not None and (
        isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not 0.0 < float(clamp) <= 1.0
    ):
        raise ValueError(f"svd_clamp: must be a quantile in (0, 1] (e.g. 0.99), got {clamp!r}")
    full = options.get("svd_full_matrices")
    if full is not None and not isinstance(full, bool):
        raise ValueError(f"svd_full_matrices: must be True or False, got {full!r}")
    driver = options.get("svd_driver")
    if driver is not None and driver not in SVD_DRIVERS:
        raise ValueError(
            f"svd_driver: unknown {driver!r}; use None or one of {', '.join(map(repr, SVD_DRIVERS))} "
            "(CUDA only)"
        )
    rule = combination_type.removesuffix("_svd")
    rule = "linear" if rule in ("svd", "cat") else rule
    if combination.PRUNING[rule] is not None:
        options["density"] = combination.check_density(options.get("density"), combination_type)
    if rule in combination.ELECTS_SIGN:
        options["majority_sign_method"] = combination.check_sign_method(
            options.get("majority_sign_method", "total")
        )
    return rule


def _bernoulli(like: torch.Tensor, density: float, shape: tuple[int, ...]) -> torch.Tensor:
    """A Bernoulli(density) 0/1 draw from torch's global RNG in ``like``'s dtype and device, filled
    in ``shape``'s row-major order (the order HF PEFT's draw fills, so a seed gives its masks)."""
    return torch.bernoulli(torch.full(shape, density, dtype=like.dtype, device=like.device))


def _signed_roots(terms: list[tuple[LoraUnit, float]]) -> tuple[list[float], list[float]]:
    """HF PEFT's factor weights: ``sqrt(|w_i s_i|)`` on B, with the sign of ``w_i s_i`` on A."""
    roots = [math.sqrt(abs(w * u.scaling)) for u, w in terms]
    signs = [1.0 if w * u.scaling >= 0 else -1.0 for u, w in terms]
    return [r * g for r, g in zip(roots, signs, strict=True)], roots


def _lora_factor_rule(
    terms: list[tuple[LoraUnit, float]], rule: str, options: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rule`` applied to the A's (weights ``sign sqrt(|w_i s_i|)``), then to the B's (weights
    ``sqrt(|w_i s_i|)``), as HF PEFT does; DARE draws A's masks (input order), then B's."""
    density = options.get("density", 1.0)
    sign_method = options.get("majority_sign_method", "total")
    weights_a, weights_b = _signed_roots(terms)
    out = []
    for weights, params in (
        (weights_a, [u.lora_A.weight for u, _ in terms]),
        (weights_b, [u.lora_B.weight for u, _ in terms]),
    ):

        def mask(i: int, params: list[torch.Tensor] = params) -> torch.Tensor:
            return combination.wide(_bernoulli(params[i], density, tuple(params[i].shape)))

        tensors = [combination.wide(p) for p in params]
        out.append(combination.merge_tensors(rule, tensors, weights, density, sign_method, mask))
    return out[0], out[1]


def _lora_delta_rule(terms: list[tuple[LoraUnit, float]], rule: str, options: dict[str, Any]) -> torch.Tensor:
    """``rule`` applied to the deltas ``s_i B_i A_i`` ((out, in) layout) with weights ``w_i``; DARE's
    masks are drawn in the layer's weight layout ((in, out) for a Conv1D), as HF PEFT does."""
    density = options.get("density", 1.0)

    def mask(i: int) -> torch.Tensor:
        unit = terms[i][0]
        out_f, in_f = unit.lora_B.weight.shape[0], unit.lora_A.weight.shape[1]
        shape = (in_f, out_f) if unit.fan_in_fan_out else (out_f, in_f)
        drawn = _bernoulli(unit.lora_A.weight, density, shape)
        return combination.wide(drawn.T if unit.fan_in_fan_out else drawn)

    deltas = [
        (combination.wide(u.lora_B.weight) @ combination.wide(u.lora_A.weight)) * u.scaling for u, _ in terms
    ]
    weights = [w for _, w in terms]
    sign_method = options.get("majority_sign_method", "total")
    return combination.merge_tensors(rule, deltas, weights, density, sign_method, mask)


def _delta_svd(
    delta: torch.Tensor, rank: int, options: dict[str, Any], unit: LoraUnit
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = V_k^T``, ``B = U_k S_k`` from the SVD of the dense ``delta`` (k = min(rank, its
    singular values)); with ``svd_clamp`` q, the entries of both are clamped to ``[-h, h]``, h the
    q-quantile of all their entries (HF PEFT's rule). The clamp depends on the signs the SVD gives
    its singular vectors, which differ between float32 and float64, so with it the SVD is taken in
    the adapter's own dtype, as HF PEFT takes it (float32 for half-precision adapters)."""
    driver = options.get("svd_driver") if delta.is_cuda else None  # the driver is CUDA's alone
    if options.get("svd_clamp") is not None:
        own = unit.lora_A.weight.dtype
        delta = delta.to(torch.float32 if own in (torch.float16, torch.bfloat16) else own)
    u, s, vh = torch.linalg.svd(delta, full_matrices=options.get("svd_full_matrices", True), driver=driver)
    k = min(rank, s.numel())
    b, a = u[:, :k] * s[:k], vh[:k]
    clamp = options.get("svd_clamp")
    if clamp is not None:
        high = torch.quantile(torch.cat([b.reshape(-1), a.reshape(-1)]), float(clamp))
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return a, b


def _truncated_svd(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of ``B A`` through QR of the thin factors: with
    ``B = Q_b R_b`` and ``A^T = Q_a R_a``, ``B A = Q_b (R_b R_a^T) Q_a^T``, so the SVD of the
    small ``R_b R_a^T`` gives that of ``B A``."""
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    k = min(rank, s.numel())
    return vh[:k] @ q_a.T, (q_b @ u[:, :k]) * s[:k]


def _pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rank components up to ``rank`` (modules with fewer inputs, or a thin SVD)."""
    missing = rank - a.shape[0]
    if missing > 0:
        a = torch.cat([a, a.new_zeros(missing, a.shape[1])], 0)
        b = torch.cat([b, b.new_zeros(b.shape[0], missing)], 1)
    return a, b


def _common_task_type(host: AdapterHost, names: list[str]) -> Any:
    found = {getattr(host.peft_config[n], "task_type", None) for n in names} - {None}
    if len(found) > 1:
        raise ValueError(
            f"adapters {names} were made for different task types {sorted(str(t) for t in found)}; "
            "combine adapters of one task"
        )
    return next(iter(found), None)
