"""Static batching: a batch of rows runs as one ``generate(..., adapter_names=[...])`` call to
the end of its longest row (``peftlab serve --batching static``; what continuous batching is
measured against in ``benchmarks/serve_load.py``).

Rows are left padded, so every row ends at the edge; an encoder-decoder's rows (the encoder's
input) are right padded, so its tokens stand where they would alone, and its decoder starts
every row at once. Finished rows keep their slot until the whole batch ends; a stopping
criterion marks each row done at its own eos, ``max_tokens`` or stop string, so its output is
what it would be alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from peftlab.core.peft_model import PeftModel
from peftlab.serving.decoding import SampledAsGreedy, StopRules
from peftlab.serving.encoder_decoder import is_encoder_decoder
from peftlab.serving.jobs import Row
from peftlab.serving.small_batch import MAX_ROWS, small_batch_linear


class RowTracker:
    """Stopping criterion for ``generate``: feeds each row's new token to its stop rules."""

    def __init__(self, rules: StopRules, rows: Sequence[Row]) -> None:
        self.rules = rules
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, -1].tolist()
        now = time.perf_counter()
        done = []
        for row, token in zip(self.rows, new, strict=True):
            if row.finish_reason is None:
                if row.job.cancelled:
                    row.finish_reason = "cancelled"
                else:
                    self.rules.advance(row, int(token), now)
            done.append(row.finish_reason is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generate_batch(
    model: PeftModel, rules: StopRules, rows: Sequence[Row], pad: int, small_batch_matmul: bool = False
) -> None:
    """Decode ``rows`` to the end as one batched ``generate`` call (runs on the model worker);
    ``small_batch_matmul``: few rows' linear layers as in :mod:`peftlab.serving.small_batch`."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    width = max(len(r.prompt_ids) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    right = is_encoder_decoder(model.base_model)
    for i, row in enumerate(rows):
        n = len(row.prompt_ids)
        where = slice(0, n) if right else slice(width - n, width)
        ids[i, where] = torch.tensor(row.prompt_ids)
        mask[i, where] = 1
    processors = LogitsProcessorList()
    if any(r.params.temperature > 0 for r in rows):
        processors.append(SampledAsGreedy(rows))
    with torch.no_grad(), small_batch_linear(small_batch_matmul and len(rows) <= MAX_ROWS):
        model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            adapter_names=[r.adapter for r in rows],
            max_new_tokens=max(r.params.max_tokens for r in rows),
            # every row is decoded greedily from the processed scores: SampledAsGreedy turns a
            # sampled row's scores into its drawn token, so nothing is inherited from the
            # model's generation_config
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=sorted(rules.eos_ids) or None,
            pad_token_id=pad,
            logits_processor=processors,
            stopping_criteria=StoppingCriteriaList([RowTracker(rules, rows)]),
        )
    for row in rows:
        if row.finish_reason is None:  # generate stopped at max_new_tokens before our check
            rules.finish(row, "length")
