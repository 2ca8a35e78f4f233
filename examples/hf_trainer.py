"""LoRA on SmolLM2-135M with transformers' Trainer; every checkpoint holds only the adapter.

The built-in ``topic`` task (sentence -> topic word), prompt tokens masked out of the loss.
A few minutes on a laptop CPU with the defaults; ``--steps 2`` is a smoke run.

    python examples/hf_trainer.py --steps 60 --out /tmp/hf-trainer
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, TrainingArguments

from peftlab import LoraConfig, PeftModel, TaskType, get_peft_model
from peftlab.data.catalog import get_task
from peftlab.data.tasks import Example
from peftlab.integrations.trainer import AdapterTrainer
from peftlab.models import load_causal_lm


def encode(tokenizer: Any, example: Example) -> dict[str, list[int]]:
    prompt = tokenizer(example.prompt)["input_ids"]
    completion = tokenizer(example.completion)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion}


@torch.no_grad()
def accuracy(model: PeftModel, tokenizer: Any, examples: tuple[Example, ...], task: Any) -> float:
    model.eval()
    predictions = []
    for ex in examples:
        ids = tokenizer(ex.prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=task.max_new_tokens, do_sample=False)
        predictions.append(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return task.score(predictions, [ex.completion for ex in examples])["accuracy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default="hf-trainer-out")
    p.add_argument("--num-eval", type=int, default=16)
    args = p.parse_args()

    base, tokenizer = load_causal_lm()  # the embedded SmolLM2-135M, no download
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, task_type=TaskType.CAUSAL_LM))
    model.print_trainable_parameters()
    task = get_task("topic")
    trainer = AdapterTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.out,
            max_steps=args.steps,
            per_device_train_batch_size=8,
            learning_rate=2e-3,
            warmup_steps=min(5, args.steps // 10),
            logging_steps=5,
            save_steps=max(1, args.steps // 2),
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
        ),
        train_dataset=[encode(tokenizer, ex) for ex in task.train],
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),  # pads labels with -100
    )
    trainer.train()  # resume a killed run with trainer.train(resume_from_checkpoint=True)
    trainer.save_model(f"{args.out}/adapter")  # adapter_config.json + adapter_model.safetensors

    held_out = task.eval[: args.num_eval]
    print(f"eval accuracy on {len(held_out)} examples: {accuracy(model, tokenizer, held_out, task):.2f}")
    # the saved adapter on a fresh copy of the base gives the same model
    reloaded = PeftModel.from_pretrained(load_causal_lm()[0], f"{args.out}/adapter")
    print(f"reloaded adapter: {accuracy(reloaded, tokenizer, held_out, task):.2f}")


if __name__ == "__main__":
    main()
