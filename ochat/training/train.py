"""The training loop: packed C-RLFT fine-tuning of a Hugging Face causal LM.

    from ochat.training.train import TrainArgs, train
    ep_dir = train(TrainArgs(model=Path("tiny"), data="out/openchat_3.5", save=Path("ckpt"), epochs=1))

The same function runs as one process (CPU or GPU) or as N processes under torchrun / accelerate
launch / deepspeed (see distributed.py). One optimiser step = `world_size x grad_accum` packed rows
of at most `batch_max_len` tokens, chosen by the multipack sampler. `loop` reads top to bottom:
batch, learning rate, micro-steps, clip and step, log, evaluate, save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ochat.errors import OchatError
from ochat.models.model_dir import ModelDir
from ochat.models.tokenizers import load_tokenizer, tokenizer_fingerprint
from ochat.training import checkpoint, distributed, varlen
from ochat.training.args import AUTO_LR_BASE, AUTO_LR_REF_TOKENS, TrainArgs
from ochat.training.data import TokenizedSplit, fingerprint, load_split, split_path
from ochat.training.loss import ChunkedHead, chunked_lm_head, global_weight_sum, weighted_ce_sum
from ochat.training.metrics import MetricsLog
from ochat.training.multipack import MultipackSampler, first_fit_decreasing
from ochat.training.packing import IGNORE, PackedBatch, dummy_batch, pack

__all__ = ["TrainArgs", "train", "lr_at"]


def lr_at(step: int, total: int, warmup: int, peak: float, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from `peak` down to `peak * min_ratio`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def log(d: distributed.Dist, msg: str) -> None:
    if d.is_main:
        tqdm.write(msg, file=sys.stderr)


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def attention_implementation(arch: str, gpu: bool) -> str:
    """How packed rows are attended: FlashAttention-2 varlen (GPU, installed), else per-conversation sdpa,
    else (architectures whose attention never sees the position ids) sdpa with transformers' packed mask."""
    if arch not in varlen.ARCHS:
        return "sdpa"
    return "flash_attention_2" if gpu and flash_attn_available() else varlen.register()


def load_model(args: TrainArgs, d: distributed.Dist) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    # FlashAttention-2 varlen on GPU when installed (transformers reads the packed rows from the position
    # ids); otherwise our per-conversation sdpa (varlen.py), which costs sum(L_i^2) where sdpa with the
    # block-diagonal mask costs L^2. Weights stay fp32 (master copy); compute is bf16 on GPU through
    # autocast / FSDP mixed precision / the DeepSpeed config.
    attn = attention_implementation(AutoConfig.from_pretrained(str(args.model)).model_type, d.device.type == "cuda")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32, attn_implementation=attn)
    except (OSError, ValueError) as e:
        raise OchatError(f"--model {args.model}: cannot load a causal LM: {str(e).splitlines()[0]}") from None
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        if args.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    return model.to(d.device)


def make_optimizer(model: torch.nn.Module, args: TrainArgs, lr: float, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # No weight decay on norms and biases (1-D tensors), as in LLaMA / nanoGPT.
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(args.beta1, args.beta2), eps=args.eps,
                             fused=device.type == "cuda")


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the causal LM under the DDP / DeepSpeed / PEFT wrappers takes `logits_to_keep` (transformers'
    Llama, Mistral, GPTBigCode, Qwen2 ... do)."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


@dataclass
class Forward:
    """sum(w * CE) of one packed row: only the supervised positions reach the lm head (`logits_to_keep`),
    and the head computes the cross-entropy in chunks (loss.ChunkedHead) where the model allows it."""

    sparse_logits: bool
    head: ChunkedHead | None
    chunk: int
    autocast: bool

    def __call__(self, model: Any, batch: PackedBatch, device: torch.device) -> torch.Tensor:
        batch = batch.to(device)
        labels, weights, extra = batch.labels, batch.weights, {}
        if self.sparse_logits:
            # Prompts are typically half or more of the tokens, and with a 32K vocabulary the lm_head +
            # softmax dominate a small model's step: project only the positions that carry a loss.
            keep = (batch.labels[0] != IGNORE).nonzero().squeeze(1)
            labels, weights, extra = batch.labels[:, keep], batch.weights[:, keep], {"logits_to_keep": keep}
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        chunked = self.head.computing_loss(labels, weights, self.chunk) if self.head else contextlib.nullcontext()
        with amp, chunked:
            # No attention mask and no cache: the per-conversation attention comes from position_ids.
            out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **extra).logits
        return out if self.head else weighted_ce_sum(out, labels, weights)


@dataclass
class Progress:
    """Where the run is; saved in SAVE/state/progress.json."""

    epoch: int = 0
    step_in_epoch: int = 0          # steps of `epoch` done
    global_step: int = 0
    best_eval: float = math.inf
    evals_since_best: int = 0
    last_eval_step: int = -1
    early_stopped: bool = False


@dataclass
class Run:
    """Everything the loop reads, made once by `prepare`."""

    args: TrainArgs
    model_type: str
    d: distributed.Dist
    train_data: TokenizedSplit
    eval_data: TokenizedSplit | None
    sampler: MultipackSampler
    total_steps: int
    warmup: int
    peak_lr: float
    engine: distributed.Engine
    forward: Forward
    identity: dict
    progress: Progress
    metrics: MetricsLog | None = None
    last_saved: Path | None = None

    def state_record(self) -> dict:
        return {**dataclasses.asdict(self.progress), "run": self.identity}


def rank_batches(data: TokenizedSplit, step_bins: list[list[int]], d: distributed.Dist, grad_accum: int) -> list[PackedBatch]:
    mine = step_bins[d.rank * grad_accum:(d.rank + 1) * grad_accum]
    return [pack([data.tokens[i] for i in b], [data.weights[i] for i in b]) for b in mine]


@torch.no_grad()
def evaluate(r: Run) -> float:
    """Weighted eval loss over the whole eval split (each rank takes every world_size-th packed row)."""
    d, data = r.d, r.eval_data
    bins = first_fit_decreasing(data.lengths, np.arange(len(data)), r.args.batch_max_len)
    mine = bins[d.rank::d.world_size]
    model = r.engine.model.module if isinstance(r.engine.model, torch.nn.parallel.DistributedDataParallel) else r.engine.model
    model.eval()
    total, weight = 0.0, 0.0
    for i in range(math.ceil(len(bins) / d.world_size)):
        # Sharded engines need the same number of forwards on every rank: a rank out of rows runs a dummy.
        batch = pack([data.tokens[j] for j in mine[i]], [data.weights[j] for j in mine[i]]) if i < len(mine) else dummy_batch()
        total += float(r.forward(model, batch, d.device))
        weight += float(batch.weights.sum())
    model.train()
    total, weight = distributed.all_reduce_sum(total, d.device), distributed.all_reduce_sum(weight, d.device)
    return total / weight if weight else float("nan")


def evaluate_and_keep_best(r: Run) -> bool:
    """Eval loss logged; SAVE/best replaced when it improved (--save-best); True when patience ran out."""
    p, args = r.progress, r.args
    loss = evaluate(r)
    p.last_eval_step = p.global_step
    improved = loss < p.best_eval
    p.best_eval, p.evals_since_best = (loss, 0) if improved else (p.best_eval, p.evals_since_best + 1)
    r.metrics.write({"step": p.global_step, "epoch": p.epoch, "eval_loss": loss, "best_eval_loss": p.best_eval})
    log(r.d, f"step {p.global_step} (epoch {p.epoch}): eval loss {loss:.4f}" + (" (best)" if improved else ""))
    if improved and args.save_best:
        checkpoint.save_model(args.save / checkpoint.BEST_DIR, r.engine, args.model, r.model_type, r.d,
                              {**args.to_json(), "step": p.global_step, "eval_loss": loss}, args.merge_lora, p.epoch)
    if args.early_stop_patience and p.evals_since_best >= args.early_stop_patience:
        log(r.d, f"early stop: no better eval loss in {p.evals_since_best} evaluations (best {p.best_eval:.4f})")
        p.early_stopped = True
    return p.early_stopped


def log_step(r: Run, bar: tqdm, batches: list[PackedBatch], conversations: int, loss_sum: float, total_w: float,
             lr: float, grad_norm: float, seconds: float) -> None:
    d, p = r.d, r.progress
    tokens = distributed.all_reduce_sum(sum(b.num_tokens for b in batches), d.device)
    supervised = distributed.all_reduce_sum(sum(int((b.weights > 0).sum()) for b in batches), d.device)
    loss = distributed.all_reduce_sum(loss_sum, d.device) / max(total_w, 1e-12)
    r.metrics.write({"step": p.global_step, "epoch": p.epoch, "conversations": conversations, "loss": loss, "lr": lr,
                     "grad_norm": grad_norm, "tokens": int(tokens), "supervised_tokens": int(supervised),
                     "tokens_per_s": tokens / seconds})
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:.0f}", refresh=False)


def end_epoch(r: Run, epoch_done: bool, stop: bool) -> None:
    """Evaluate (unless this step just did), save SAVE/ep_N when due, then the resumable state."""
    args, p = r.args, r.progress
    if r.eval_data is not None and p.last_eval_step != p.global_step:
        stop = evaluate_and_keep_best(r) or stop
    if (p.epoch + 1) % args.save_every == 0 or p.epoch == args.epochs - 1 or stop:
        r.last_saved = checkpoint.epoch_dir(args.save, p.epoch)
        checkpoint.save_model(r.last_saved, r.engine, args.model, r.model_type, r.d, args.to_json(), args.merge_lora, p.epoch)
        log(r.d, f"saved {r.last_saved}")
    if epoch_done:
        p.epoch, p.step_in_epoch = p.epoch + 1, 0
    checkpoint.save_state(args.save, r.engine, r.state_record(), r.d)


def loop(r: Run, bar: tqdm) -> None:
    args, d, engine, p = r.args, r.d, r.engine, r.progress
    stop = p.global_step >= r.total_steps or p.early_stopped
    while p.epoch < args.epochs and not stop:
        steps = r.sampler.steps(p.epoch)
        while p.step_in_epoch < len(steps) and not stop:
            t0 = time.perf_counter()
            # batch: this rank's packed rows of the step; the step's loss weight over all ranks
            batches = rank_batches(r.train_data, steps[p.step_in_epoch], d, args.grad_accum)
            total_w = global_weight_sum(sum(float(b.weights.sum()) for b in batches), d.device)
            # learning rate
            lr = lr_at(p.global_step, r.total_steps, r.warmup, r.peak_lr, args.lr_min_ratio)
            engine.set_lr(lr)
            # micro-steps: the gradient of sum(w * CE) / sum(w) over the global batch
            loss_sum = 0.0
            for i, batch in enumerate(batches):
                with engine.micro_step(last=i == len(batches) - 1):
                    part = r.forward(engine.model, batch, d.device)
                    engine.backward(part / total_w.clamp(min=1e-12).to(part.dtype) * engine.grad_scale)
                loss_sum += float(part.detach())
            # clip and step
            grad_norm = engine.step(args.max_grad_norm)
            p.global_step, p.step_in_epoch = p.global_step + 1, p.step_in_epoch + 1
            # log
            conversations = sum(len(b) for b in steps[p.step_in_epoch - 1])
            log_step(r, bar, batches, conversations, loss_sum, float(total_w), lr, grad_norm, time.perf_counter() - t0)
            stop = p.global_step >= r.total_steps
            # evaluate every --eval-every steps (the epoch's end evaluates anyway)
            if r.eval_data is not None and args.eval_every and p.global_step % args.eval_every == 0:
                stop = evaluate_and_keep_best(r) or stop
            # save the resumable state every --state-every steps
            if not stop and p.step_in_epoch < len(steps) and args.state_every and p.global_step % args.state_every == 0:
                checkpoint.save_state(args.save, engine, r.state_record(), d)
        end_epoch(r, epoch_done=p.step_in_epoch >= len(steps), stop=stop)
        stop = stop or p.early_stopped


def load_data(args: TrainArgs, model_type: str, d: distributed.Dist) -> tuple[TokenizedSplit, TokenizedSplit | None]:
    tok_fp = tokenizer_fingerprint(load_tokenizer(args.model))
    splits = [load_split(args.data, split, model_type, tok_fp, args.model, args.batch_max_len, args.strict)
              if split == "train" or split_path(args.data, split).exists() else None for split in ("train", "eval")]
    for split in splits:
        if split is not None and split.truncated:
            log(d, f"{split.path}: truncated {split.truncated} conversation(s) longer than --batch-max-len "
                   f"{args.batch_max_len} (--strict refuses them instead)")
    return splits[0], (splits[1] if splits[1] is not None and len(splits[1]) else None)  # an empty eval split: none


def schedule(args: TrainArgs, data: TokenizedSplit, d: distributed.Dist) -> tuple[MultipackSampler, int, int, float]:
    """The sampler, total steps, warm-up steps and peak learning rate."""
    bins_per_step = d.world_size * args.grad_accum
    sampler = MultipackSampler(data.lengths, args.batch_max_len, bins_per_step, args.seed, args.packing_window)
    steps_per_epoch = [sampler.num_steps(e) for e in range(args.epochs)]
    if steps_per_epoch[0] == 0:
        raise OchatError(f"{data.path}: {len(data)} conversations do not fill one step of "
                         f"{bins_per_step} packed row(s) of {args.batch_max_len} tokens (lower --batch-max-len)")
    total = min(sum(steps_per_epoch), args.max_steps or sum(steps_per_epoch))
    peak_lr = args.lr
    if args.lr == "auto":
        first = sampler.steps(0)
        per_step = np.mean([sum(int((data.weights[i][1:] > 0).sum()) for b in step for i in b) for step in first])
        peak_lr = AUTO_LR_BASE * math.sqrt(per_step / AUTO_LR_REF_TOKENS)
        log(d, f"--lr auto: {per_step:.0f} supervised tokens/step -> lr {peak_lr:.3g}")
    return sampler, total, math.ceil(args.warmup_ratio * total), float(peak_lr)


def run_identity(args: TrainArgs, data: TokenizedSplit, d: distributed.Dist) -> dict:
    """What must not change between a run and its --resume (the schedule and the data order depend on it)."""
    return {"data": fingerprint(data), "model": str(args.model.resolve()), "model_type": args.model_type,
            "seed": args.seed, "batch_max_len": args.batch_max_len, "grad_accum": args.grad_accum,
            "world_size": d.world_size, "packing_window": args.packing_window, "lora_r": args.lora_r}


def resume(args: TrainArgs, engine: distributed.Engine, identity: dict, d: distributed.Dist) -> Progress:
    state = checkpoint.find_state(args.save) if args.resume else None
    if state is None:
        if args.resume:
            log(d, f"--resume: no state in {args.save}, starting from the beginning")
        return Progress()
    checkpoint.check_same_run(state, checkpoint.read_progress(state).get("run", {}), identity)
    record = checkpoint.load_state(state, engine)
    progress = Progress(**{f.name: record[f.name] for f in dataclasses.fields(Progress) if f.name in record})
    log(d, f"resumed from {state} at epoch {progress.epoch}, step {progress.global_step}")
    return progress


def prepare(args: TrainArgs, model_type: str, d: distributed.Dist) -> Run:
    for line in checkpoint.prepare_save_dir(args.save, args.resume, args.overwrite, d):
        log(d, line)
    torch.manual_seed(args.seed)
    train_data, eval_data = load_data(args, model_type, d)
    sampler, total_steps, warmup, peak_lr = schedule(args, train_data, d)
    model = load_model(args, d)
    forward = Forward(accepts_logits_to_keep(model), chunked_lm_head(model), args.ce_chunk,
                      autocast=d.device.type == "cuda" and not args.fsdp and args.deepspeed is None)
    engine = distributed.make_engine(model, lambda m: make_optimizer(m, args, peak_lr, d.device), d, args.grad_accum,
                                     args.max_grad_norm, args.fsdp, args.deepspeed)
    identity = {**run_identity(args, train_data, d), "model_type": model_type}
    progress = resume(args, engine, identity, d)
    return Run(args, model_type, d, train_data, eval_data, sampler, total_steps, warmup, peak_lr, engine, forward,
               identity, progress)


def train(args: TrainArgs) -> Path:
    """Train; return the directory of the last saved epoch checkpoint (`SAVE/ep_N`)."""
    args.model, args.save = Path(args.model), Path(args.save)
    model_type = ModelDir(args.model, "--model", args.model_type).model_type.name
    started_here = not torch.distributed.is_initialized()
    d = distributed.setup(use_deepspeed=args.deepspeed is not None)
    try:
        r = prepare(args, model_type, d)
        args.save.mkdir(parents=True, exist_ok=True)
        r.metrics = MetricsLog(args.save, args, d, r.progress.global_step)
        log(d, f"{len(r.train_data)} conversations, {d.world_size} process(es) x {args.grad_accum} packed row(s) of "
               f"{args.batch_max_len} tokens per step, {r.total_steps} steps, packing efficiency "
               f"{r.sampler.efficiency(0):.1%} (epoch 0), lr {r.peak_lr:.3g}, device {d.device}")
        bar = tqdm(total=r.total_steps, initial=r.progress.global_step, disable=not (d.is_main and args.progress),
                   desc="train", unit="step", dynamic_ncols=True)
        try:
            loop(r, bar)
        finally:
            bar.close()
            r.metrics.close()
        last = r.last_saved or checkpoint.epoch_dir(args.save, min(r.progress.epoch, args.epochs - 1))
        log(d, f"done: {r.progress.global_step} steps; model {last}, resumable state {args.save / checkpoint.STATE_DIR}, "
               f"metrics {args.save / 'metrics.jsonl'}" + (f", best {args.save / 'best'}" if args.save_best else ""))
        return last
    finally:
        if started_here:
            distributed.teardown()
