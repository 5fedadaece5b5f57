"""`ochat bench train`: padding-free multipack vs conventional padded batches, side by side in one run.

Same model (one random init, copied), same data (ShareGPT-like lengths), same token budget per step
(`--batch-max-len`), same loss and optimiser. The contenders:

- multipack: one packed row per step, position ids restarting per conversation, no attention mask,
  attention per conversation (FlashAttention-2 varlen on GPU when installed, else varlen.py's sdpa);
- padded (conventional): a fixed batch size sized for the budget at the longest conversation
  (budget // max_len, as one sets `per_device_train_batch_size` for a memory budget), HF Trainer's
  length-grouped sampler (mega-batches of 50 batches sorted by length), right padding, attention mask;
- padded (token budget): the same padding, but each length-grouped batch grows while
  batch_size x longest <= budget (a stronger baseline than most trainers use).

The contenders take turns in short time slices (round robin), so a noisy shared machine slows each
the same way. Reported: supervised tokens/s (tokens with loss weight > 0 per second, optimiser step
included), ratio to multipack, fill of the token budget (packing efficiency), and peak activation
memory (bytes saved for backward by the largest step; on GPU the allocator's peak).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from ochat.errors import OchatError
from ochat.training import varlen
from ochat.training.loss import chunked_lm_head, weighted_ce_sum
from ochat.training.multipack import MultipackSampler
from ochat.training.packing import IGNORE, PackedBatch, pack, shifted_labels
from ochat.training.train import Forward, accepts_logits_to_keep
from ochat.synthetic.token_rows import random_token_rows, sharegpt_like_lengths

console = Console(stderr=True)


@dataclass
class Batch:
    kwargs: dict                 # model inputs
    labels: torch.Tensor
    weights: torch.Tensor
    real_tokens: int             # non-pad tokens
    computed_tokens: int         # tokens the model computes (pads included)
    packed: PackedBatch | None = None   # the packed row itself (multipack)


@dataclass
class Measured:
    """What a contender has done so far (summed over its measured slices)."""

    seconds: float = 0.0
    steps: int = 0
    supervised: int = 0
    real: int = 0
    computed: int = 0
    peak_bytes: int = 0
    losses: list[float] = field(default_factory=list)


@dataclass(kw_only=True)
class Contender(Measured):
    name: str
    batches: Iterator[list[Batch]]   # one optimiser step = a list of micro-batches
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    forward: Forward | None = None   # ochat's training forward (multipack); None: full logits + weighted CE

    def run(self, seconds: float, device: torch.device, measure_memory: bool) -> None:
        run_slice(self, seconds, device, measure_memory)


def packed_batches(tokens, weights, lengths, budget: int, seed: int) -> Iterator[list[Batch]]:
    """One packed row of at most `budget` tokens per step (what `ochat train` does on one process)."""
    sampler = MultipackSampler(lengths, budget, 1, seed)
    epoch = 0
    while True:
        for (bin_,) in sampler.steps(epoch):
            b = pack([tokens[i] for i in bin_], [weights[i] for i in bin_])
            yield [Batch({"input_ids": b.input_ids, "position_ids": b.position_ids}, b.labels, b.weights,
                         b.num_tokens, b.num_tokens, b)]
        epoch += 1


def length_grouped_order(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[int]:
    """transformers' LengthGroupedSampler: shuffle, cut into mega-batches of 50 batches, sort each by length."""
    perm = rng.permutation(len(lengths))
    mega = 50 * batch_size
    return [int(i) for s in range(0, len(perm), mega)
            for i in sorted(perm[s:s + mega], key=lambda j: -lengths[j])]


def padded_batch(tokens, weights, idx: list[int]) -> Batch:
    n = max(len(tokens[i]) for i in idx)
    ids = torch.zeros(len(idx), n, dtype=torch.long)
    mask = torch.zeros(len(idx), n, dtype=torch.long)
    labels = torch.full((len(idx), n), IGNORE, dtype=torch.long)
    w = torch.zeros(len(idx), n)
    for r, i in enumerate(idx):
        t = np.asarray(tokens[i], dtype=np.int64)
        lab, lw = shifted_labels(t, np.asarray(weights[i], dtype=np.float32))
        ids[r, :len(t)] = torch.from_numpy(t)
        mask[r, :len(t)] = 1
        labels[r, :len(t)] = torch.from_numpy(lab)
        w[r, :len(t)] = torch.from_numpy(lw)
    real = int(mask.sum())
    return Batch({"input_ids": ids, "attention_mask": mask}, labels, w, real, len(idx) * n)


def padded_fixed_batches(tokens, weights, lengths, budget: int, seed: int) -> Iterator[list[Batch]]:
    batch_size = max(1, budget // int(lengths.max()))
    rng = np.random.default_rng(seed)
    while True:
        order = length_grouped_order(lengths, batch_size, rng)
        for s in range(0, len(order) - batch_size + 1, batch_size):
            yield [padded_batch(tokens, weights, order[s:s + batch_size])]


def padded_budget_batches(tokens, weights, lengths, budget: int, seed: int) -> Iterator[list[Batch]]:
    rng = np.random.default_rng(seed)
    while True:
        order = length_grouped_order(lengths, 64, rng)
        idx: list[int] = []
        longest = 0
        for i in order:
            longest_if = max(longest, int(lengths[i]))
            if idx and longest_if * (len(idx) + 1) > budget:
                yield [padded_batch(tokens, weights, idx)]
                idx, longest_if = [], int(lengths[i])
            idx.append(i)
            longest = longest_if


def saved_tensor_bytes(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Run `fn` (a forward pass) and count the bytes autograd keeps for backward."""
    seen: dict[int, int] = {}

    def pack_hook(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def run_slice(c: Contender, seconds: float, device: torch.device, measure_memory: bool) -> None:
    deadline = time.perf_counter() + seconds
    while True:
        step = next(c.batches)
        t0 = time.perf_counter()
        total_w = sum(float(b.weights.sum()) for b in step)
        loss_sum = 0.0
        for b in step:
            kwargs = {k: v.to(device) for k, v in b.kwargs.items()}
            labels, weights = b.labels.to(device), b.weights.to(device)

            def forward() -> torch.Tensor:
                if c.forward is not None:  # exactly what `ochat train` runs (supervised logits, chunked CE)
                    return c.forward(c.model, b.packed, device)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    return weighted_ce_sum(c.model(**kwargs, use_cache=False).logits, labels, weights)

            if measure_memory and device.type == "cpu":
                part, nbytes = saved_tensor_bytes(forward)
                c.peak_bytes = max(c.peak_bytes, nbytes)
            else:
                part = forward()
            (part / max(total_w, 1e-12)).backward()
            loss_sum += float(part.detach())
            del part
        torch.nn.utils.clip_grad_norm_(c.model.parameters(), 1.0)
        c.optimizer.step()
        c.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        c.seconds += time.perf_counter() - t0
        c.steps += 1
        c.supervised += sum(int((b.weights > 0).sum()) for b in step)
        c.real += sum(b.real_tokens for b in step)
        c.computed += sum(b.computed_tokens for b in step)
        c.losses.append(loss_sum / max(total_w, 1e-12))
        if time.perf_counter() >= deadline:
            break


@dataclass
class TrainBenchResult:
    """One `ochat bench train` run: a row per contender (printed as this JSON with --json)."""
    device: str
    params: int
    batch_max_len: int
    results: list[dict] = field(default_factory=list)


def make_contenders(tokens, weights, lengths, batch_max_len: int, base: torch.nn.Module, device: torch.device,
                    seed: int) -> list[Contender]:
    # As in `ochat train`: FlashAttention-2 varlen on GPU when installed, else per-conversation sdpa.
    from ochat.training.train import flash_attn_available

    attn = "flash_attention_2" if device.type == "cuda" and flash_attn_available() else varlen.register()

    def contender(name: str, batches: Iterator[list[Batch]], attn_impl: str = "sdpa", ours: bool = False) -> Contender:
        model = copy.deepcopy(base).train()
        model.set_attn_implementation(attn_impl)
        forward = Forward(accepts_logits_to_keep(model), chunked_lm_head(model), 4096, device.type == "cuda") if ours else None
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
        return Contender(name=name, batches=batches, model=model, optimizer=optimizer, forward=forward)

    return [
        contender("ochat multipack (padding-free)", packed_batches(tokens, weights, lengths, batch_max_len, seed), attn,
                  ours=True),
        contender("padded, fixed batch", padded_fixed_batches(tokens, weights, lengths, batch_max_len, seed)),
        contender("padded, token budget", padded_budget_batches(tokens, weights, lengths, batch_max_len, seed)),
    ]


def measure(contenders: list[Contender], seconds: float, rounds: int, device: torch.device) -> None:
    """A warm-up step each (allocators, kernels; not measured), then round-robin time slices."""
    for c in contenders:
        c.run(0.0, device, measure_memory=False)
        c.seconds = c.steps = c.supervised = c.real = c.computed = 0
        c.losses.clear()
    for r in range(rounds):
        for c in contenders:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            c.run(seconds / rounds, device, measure_memory=True)
            if device.type == "cuda":
                c.peak_bytes = max(c.peak_bytes, torch.cuda.max_memory_allocated())
        console.print(f"round {r + 1}/{rounds}: " + ", ".join(f"{c.name}: {c.steps} steps" for c in contenders))


def summarize(contenders: list[Contender], lengths, batch_max_len: int, n_params: int, device: torch.device,
              seed: int, peak_tflops: float) -> TrainBenchResult:
    ref = contenders[0].supervised / contenders[0].seconds
    results = []
    for c in contenders:
        tps = c.supervised / c.seconds
        results.append({
            "method": c.name, "steps": c.steps, "seconds": round(c.seconds, 2),
            "supervised_tokens_per_s": round(tps, 1), "multipack_speedup": round(ref / tps, 2),
            "budget_fill": round(c.real / (c.steps * batch_max_len), 4),
            "pad_fraction": round(1 - c.real / c.computed, 4),
            "peak_memory_mib": round(c.peak_bytes / 2**20, 1),
        })
    packer = MultipackSampler(lengths, batch_max_len, 1, seed)
    results[0]["packing_efficiency"] = round(packer.efficiency(0), 4)
    if device.type == "cuda":
        for c, r in zip(contenders, results):
            r["mfu"] = round(6 * n_params * (c.computed / c.seconds) / (peak_tflops * 1e12), 4)
    return TrainBenchResult(str(device), n_params, batch_max_len, results)


def trl_peer(base, tokens, weights, batch_max_len: int, seed: int, device: torch.device):
    try:
        import trl  # noqa: F401
    except ImportError:
        raise OchatError("ochat bench train: the TRL peer needs the package trl (pip install 'ochat[bench]'), "
                         "or pass --no-trl") from None
    import tempfile

    from ochat.training.bench_trl import make_trl_contender

    return make_trl_contender(base, tokens, weights, batch_max_len, seed, device, tempfile.mkdtemp(prefix="ochat-trl-"))


def render_train_bench(result: TrainBenchResult) -> Table:
    table = Table(title=f"ochat bench train ({result.device})",
                  caption=f"multipack packing efficiency (epoch 0, real tokens / bin capacity): "
                          f"{result.results[0]['packing_efficiency']:.2%}")
    for col in ("method", "supervised tok/s", "multipack speedup", "budget fill", "pad fraction", "peak memory MiB"):
        table.add_column(col)
    for r in result.results:
        table.add_row(r["method"], f"{r['supervised_tokens_per_s']:.0f}", f"{r['multipack_speedup']:.2f}x",
                      f"{r['budget_fill']:.1%}", f"{r['pad_fraction']:.1%}",
                      f"{r['peak_memory_mib']:.1f}" if r["peak_memory_mib"] else "-")
    return table


def bench_train(
    conversations: int = typer.Option(2000, help="Synthetic conversations (ShareGPT-like lengths)"),
    median_len: int = typer.Option(300, "--median-len"),
    max_len: int = typer.Option(2048, "--max-len", help="Longest conversation (the context)"),
    batch_max_len: int = typer.Option(8192, "--batch-max-len", help="Token budget per step (all contenders)"),
    hidden_size: int = typer.Option(64, "--hidden-size"),
    layers: int = typer.Option(2, "--layers"),
    heads: int = typer.Option(4, "--heads"),
    vocab_size: int = typer.Option(32002, "--vocab-size", help="32002 = the Mistral tokenizer + <|end_of_turn|>"),
    seconds: float = typer.Option(60.0, "--seconds", help="Measured seconds per contender"),
    rounds: int = typer.Option(4, "--rounds", help="Round-robin slices per contender"),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0: torch's default)"),
    seed: int = typer.Option(0, "--seed"),
    peak_tflops: float = typer.Option(989.0, "--peak-tflops", help="GPU dense bf16 peak for MFU (H100 SXM: 989)"),
    trl: bool = typer.Option(True, "--trl/--no-trl", help="Add TRL's SFTTrainer (packing, completion-only) as a peer"),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout"),
) -> None:
    """ochat's padding-free multipack vs TRL's SFTTrainer and padded batches: supervised tokens/s, budget fill."""
    from transformers import AutoModelForCausalLM

    from ochat.models.tiny import tiny_config

    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lengths = sharegpt_like_lengths(conversations, seed, median=median_len, max_len=max_len)
    tokens, weights = random_token_rows(lengths, vocab_size, seed)
    torch.manual_seed(seed)
    config = tiny_config("llama", vocab_size=vocab_size, max_positions=max_len, hidden_size=hidden_size,
                         layers=layers, heads=heads)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)
    n_params = sum(p.numel() for p in base.parameters())
    contenders = make_contenders(tokens, weights, lengths, batch_max_len, base, device, seed)
    if trl:
        contenders.append(trl_peer(base, tokens, weights, batch_max_len, seed, device))
    fixed_bs = max(1, batch_max_len // int(lengths.max()))
    console.print(f"{conversations} conversations (median {int(np.median(lengths))}, mean {lengths.mean():.0f}, "
                  f"max {lengths.max()} tokens), budget {batch_max_len} tokens/step (fixed batch size {fixed_bs}), "
                  f"model {n_params / 1e6:.1f}M params (hidden {hidden_size}, {layers} layers, vocab {vocab_size}), "
                  f"{device}, {torch.get_num_threads()} thread(s)")
    measure(contenders, seconds, rounds, device)
    result = summarize(contenders, lengths, batch_max_len, n_params, device, seed, peak_tflops)
    console.print(render_train_bench(result))
    if json_out:
        print(json.dumps(asdict(result), indent=2))
