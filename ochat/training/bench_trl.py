"""TRL's `SFTTrainer` as a peer in `ochat bench train`: the same model (a copy of the one random init),
the same conversations and the same token budget, packed its own way.

TRL gets the pre-tokenized rows with a `completion_mask` (1 where ochat's loss weight is > 0, so both
learn the same tokens), `packing=True` with its best-fit-decreasing strategy (`bfd`, padding-free rows
with position ids), `completion_only_loss=True`, `max_length` = the budget and one packed row per step,
AdamW with the same betas, lr and clipping. It runs its own loop (`trainer.train()`), so each round
runs it for about the slice's duration; a step is timed from one step's end to the next (data loading,
forward, backward, clipping and optimiser included), the first step of every round left out.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ochat.training.bench import Measured


def tiny_tokenizer(vocab_size: int) -> Any:
    """A tokenizer object for TRL's collator (it reads pad / eos ids; the data is already token ids)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@dataclass(kw_only=True)
class TrlContender(Measured):
    name: str
    trainer: Any
    step_seconds: float = 0.0   # the last measured step, to size the next slice

    def run(self, seconds: float, device: torch.device, measure_memory: bool) -> None:
        steps = 2 if not self.step_seconds else max(2, round(seconds / self.step_seconds) + 1)
        self.trainer.args.max_steps = steps
        timer = self.trainer.step_timer
        timer.start_round()
        self.trainer.train()
        measured = timer.rows[1:]  # the first step of a round pays the loader's and the optimiser's set-up
        self.seconds += sum(s for s, _, _ in measured)
        self.steps += len(measured)
        self.supervised += sum(n for _, n, _ in measured)
        self.real += sum(t for _, _, t in measured)
        self.computed += sum(t for _, _, t in measured)
        self.step_seconds = float(np.median([s for s, _, _ in timer.rows]))


def make_trl_contender(base: torch.nn.Module, tokens, weights, batch_max_len: int, seed: int,
                       device: torch.device, out_dir: str) -> TrlContender:
    if device.type != "cuda":
        # transformers' Trainer imports deepspeed when it is installed, whose accelerator auto-detection
        # would print a warning on stdout (where --json goes); say it instead.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    class StepTimer(TrainerCallback):
        """(seconds, supervised tokens, tokens) of each step of the current round."""

        def start_round(self) -> None:
            self.rows: list[tuple[float, int, int]] = []
            self.last = None
            self.pending = (0, 0)

        def on_step_begin(self, args, state, control, **kwargs):
            if self.last is None:
                self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.rows.append((now - self.last, *self.pending))
            self.last = now

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            labels = inputs["labels"]
            self.step_timer.pending = (int((labels != -100).sum()), int(labels.numel()))
            return super().training_step(model, inputs, num_items_in_batch)

    data = Dataset.from_dict({"input_ids": [np.asarray(t, dtype=np.int64).tolist() for t in tokens],
                              "completion_mask": [(np.asarray(w) > 0).astype(np.int64).tolist() for w in weights]})
    gpu = device.type == "cuda"
    config = SFTConfig(output_dir=out_dir, packing=True, packing_strategy="bfd", completion_only_loss=True,
                       max_length=batch_max_len, per_device_train_batch_size=1, gradient_accumulation_steps=1,
                       learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                       adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, max_steps=2, logging_steps=10**9,
                       save_strategy="no", report_to="none", seed=seed, use_cpu=not gpu, bf16=gpu,
                       dataloader_num_workers=0, disable_tqdm=True, dataset_num_proc=1)
    model = copy.deepcopy(base).train()
    model.set_attn_implementation("sdpa")
    trainer = CountingSFTTrainer(model=model, args=config, train_dataset=data,
                                 processing_class=tiny_tokenizer(model.config.vocab_size))
    trainer.remove_callback(PrinterCallback)  # it prints the train() summary on stdout, where --json goes
    trainer.step_timer = StepTimer()
    trainer.add_callback(trainer.step_timer)
    return TrlContender(name=f"TRL {__import__('trl').__version__} SFTTrainer (packing bfd, completion-only)",
                        trainer=trainer)
