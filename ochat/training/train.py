"""The training loop: packed C-RLFT fine-tuning of a Hugging Face causal LM.

    from ochat.training.train import TrainArgs, train
    ep_dir = train(TrainArgs(model=Path("tiny"), data="out/openchat_3.5", save=Path("ckpt"), epochs=1))

The same function runs as one process (CPU or GPU) or as N processes under torchrun / accelerate
launch / deepspeed (see distributed.py). One optimiser step = `world_size x grad_accum` packed rows
of at most `batch_max_len` tokens, chosen by the multipack sampler.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ochat.errors import OchatError
from ochat.models.tiny import read_ochat_json
from ochat.models.tokenizers import load_tokenizer, tokenizer_fingerprint
from ochat.templates.registry import get_model_type
from ochat.training import checkpoint, distributed, varlen
from ochat.training.args import AUTO_LR_BASE, AUTO_LR_REF_TOKENS, TrainArgs
from ochat.training.data import TokenizedSplit, load_split, split_path
from ochat.training.loss import global_weight_sum, weighted_ce_sum
from ochat.training.multipack import MultipackSampler, first_fit_decreasing
from ochat.training.packing import IGNORE, PackedBatch, dummy_batch, pack
from ochat.utils.atomic import atomic_write_text

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
    from transformers import AutoModelForCausalLM

    gpu = d.device.type == "cuda"
    # FlashAttention-2 varlen on GPU when installed (transformers reads the packed rows from the position
    # ids); otherwise our per-conversation sdpa (varlen.py), which costs sum(L_i^2) where sdpa with the
    # block-diagonal mask costs L^2. Weights stay fp32 (master copy); compute is bf16 on GPU through
    # autocast / FSDP mixed precision / the DeepSpeed config.
    from transformers import AutoConfig

    attn = attention_implementation(AutoConfig.from_pretrained(str(args.model)).model_type, gpu)
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


def supervised_tokens(batches: list[PackedBatch]) -> int:
    return int(sum((b.weights > 0).sum() for b in batches))


def rank_batches(data: TokenizedSplit, step_bins: list[list[int]], d: distributed.Dist, grad_accum: int) -> list[PackedBatch]:
    mine = step_bins[d.rank * grad_accum:(d.rank + 1) * grad_accum]
    return [pack([data.tokens[i] for i in b], [data.weights[i] for i in b]) for b in mine]


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the causal LM under the DDP / DeepSpeed / PEFT wrappers takes `logits_to_keep` (transformers'
    Llama, Mistral, GPTBigCode, Qwen2 ... do)."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def forward_loss_sum(model: Any, batch: PackedBatch, device: torch.device, autocast: bool,
                     supervised_logits_only: bool = False) -> torch.Tensor:
    batch = batch.to(device)
    labels, weights, extra = batch.labels, batch.weights, {}
    if supervised_logits_only:
        # Project only the positions that carry a loss onto the vocabulary: prompts are typically half or
        # more of the tokens, and with a 32K vocabulary the lm_head + softmax dominate a small model's step.
        keep = (batch.labels[0] != IGNORE).nonzero().squeeze(1)
        labels, weights, extra = batch.labels[:, keep], batch.weights[:, keep], {"logits_to_keep": keep}
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        # No attention mask and no cache: the per-conversation attention comes from position_ids.
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **extra).logits
    return weighted_ce_sum(logits, labels, weights)


@torch.no_grad()
def evaluate(model: Any, data: TokenizedSplit, args: TrainArgs, d: distributed.Dist, autocast: bool) -> float:
    """Weighted eval loss over the whole eval split (each rank takes every world_size-th packed row)."""
    bins = first_fit_decreasing(data.lengths, np.arange(len(data)), args.batch_max_len)
    mine = bins[d.rank::d.world_size]
    rows = math.ceil(len(bins) / d.world_size)
    eval_model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    eval_model.eval()
    sparse_logits = accepts_logits_to_keep(eval_model)
    total, weight = 0.0, 0.0
    for i in range(rows):
        if i < len(mine):
            batch = pack([data.tokens[j] for j in mine[i]], [data.weights[j] for j in mine[i]])
        else:
            batch = dummy_batch()  # sharded engines need the same number of forwards on every rank
        total += float(forward_loss_sum(eval_model, batch, d.device, autocast, sparse_logits))
        weight += float(batch.weights.sum())
    eval_model.train()
    total = distributed.all_reduce_sum(total, d.device)
    weight = distributed.all_reduce_sum(weight, d.device)
    return total / weight if weight else float("nan")


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut short by a crash counts as not written."""
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return math.inf


class MetricsLog:
    """SAVE/metrics.jsonl (rank 0), plus TensorBoard or W&B when asked for."""

    def __init__(self, save: Path, args: TrainArgs, d: distributed.Dist, resume_step: int):
        self.enabled = d.is_main
        self.path = save / "metrics.jsonl"
        self.tb = self.wandb = None
        if not self.enabled:
            return
        if self.path.exists():
            # Drop records of steps that the resumed run will redo.
            keep = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in keep))
        self.file = open(self.path, "a", encoding="utf-8")
        if args.report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise OchatError("--report-to tensorboard needs the package tensorboard (pip install tensorboard)") from None
            self.tb = SummaryWriter(str(save / "tensorboard"))
        elif args.report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise OchatError("--report-to wandb needs the package wandb (pip install wandb)") from None
            self.wandb = wandb.init(project=Path(args.model).name, config=args.to_json(), dir=str(save))
        elif args.report_to != "none":
            raise OchatError(f"--report-to {args.report_to}: expected none, tensorboard or wandb")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def check_save_dir(args: TrainArgs) -> None:
    save = Path(args.save)
    if args.resume or args.overwrite or not save.exists():
        return
    if any(p.name.startswith("ep_") or p.name == checkpoint.STATE_DIR for p in save.iterdir()):
        raise OchatError(f"--save {save}: already holds checkpoints (pass --resume to continue that run, "
                         f"or --overwrite, or choose a new directory)")


def train(args: TrainArgs) -> Path:
    """Train; return the directory of the last saved epoch checkpoint (`SAVE/ep_N`)."""
    args.model, args.save = Path(args.model), Path(args.save)
    check_save_dir(args)
    if not (args.model / "config.json").exists():
        raise OchatError(f"--model {args.model}: not a Hugging Face model directory (no config.json)")
    model_type = args.model_type or read_ochat_json(args.model).get("model_type")
    if not model_type:
        raise OchatError(f"--model {args.model}: no ochat.json with a model type; pass --model-type")
    get_model_type(model_type)  # validates the name
    started_here = not torch.distributed.is_initialized()
    d = distributed.setup(use_deepspeed=args.deepspeed is not None)
    try:
        return _train(args, model_type, d)
    finally:
        if started_here:
            distributed.teardown()


def _train(args: TrainArgs, model_type: str, d: distributed.Dist) -> Path:
    torch.manual_seed(args.seed)
    fingerprint = tokenizer_fingerprint(load_tokenizer(args.model))
    train_data = load_split(args.data, "train", model_type, fingerprint, args.model, args.batch_max_len, args.strict)
    eval_data = None
    if split_path(args.data, "eval").exists():
        eval_data = load_split(args.data, "eval", model_type, fingerprint, args.model, args.batch_max_len, args.strict)
    for split in (train_data, eval_data):
        if split is not None and split.truncated:
            log(d, f"{split.path}: truncated {split.truncated} conversation(s) longer than --batch-max-len "
                   f"{args.batch_max_len} (--strict refuses them instead)")

    bins_per_step = d.world_size * args.grad_accum
    sampler = MultipackSampler(train_data.lengths, args.batch_max_len, bins_per_step, args.seed, args.packing_window)
    steps_per_epoch = [sampler.num_steps(e) for e in range(args.epochs)]
    total_steps = sum(steps_per_epoch)
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    if steps_per_epoch[0] == 0:
        raise OchatError(f"{train_data.path}: {len(train_data)} conversations do not fill one step of "
                         f"{bins_per_step} packed row(s) of {args.batch_max_len} tokens (lower --batch-max-len)")
    warmup = math.ceil(args.warmup_ratio * total_steps)

    if args.lr == "auto":
        first = sampler.steps(0)
        per_step = np.mean([sum(int((train_data.weights[i][1:] > 0).sum()) for b in step for i in b) for step in first])
        peak_lr = AUTO_LR_BASE * math.sqrt(per_step / AUTO_LR_REF_TOKENS)
        log(d, f"--lr auto: {per_step:.0f} supervised tokens/step -> lr {peak_lr:.3g}")
    else:
        peak_lr = float(args.lr)

    model = load_model(args, d)
    gpu = d.device.type == "cuda"
    autocast = gpu and not args.fsdp and args.deepspeed is None
    if args.deepspeed is not None:
        optimizer = make_optimizer(model, args, peak_lr, d.device)
        model = distributed.deepspeed_initialize(model, optimizer, args.deepspeed, args.grad_accum, d.world_size,
                                                 args.max_grad_norm)
        optimizer = model.optimizer
    else:
        # After wrapping: FSDP replaces the parameters by sharded ones, the optimiser must see those.
        model = distributed.wrap_ddp_or_fsdp(model, d, args.fsdp, bf16=gpu)
        optimizer = make_optimizer(model, args, peak_lr, d.device)
    is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)

    start_epoch, start_step, global_step = 0, 0, 0
    if args.resume:
        state = checkpoint.find_state(args.save)
        if state is None:
            log(d, f"--resume: no state in {args.save}, starting from the beginning")
        else:
            progress = checkpoint.load_state(state, model, optimizer)
            start_epoch, start_step, global_step = progress["epoch"], progress["step_in_epoch"], progress["global_step"]
            log(d, f"resumed from {state} at epoch {start_epoch}, step {global_step}")
    args.save.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(args.save, args, d, global_step)

    log(d, f"{len(train_data)} conversations, {d.world_size} process(es) x {args.grad_accum} packed row(s) of "
           f"{args.batch_max_len} tokens per step, {total_steps} steps, packing efficiency "
           f"{sampler.efficiency(0):.1%} (epoch 0), lr {peak_lr:.3g}, device {d.device}")
    bar = tqdm(total=total_steps, initial=global_step, disable=not (d.is_main and args.progress),
               desc="train", unit="step", dynamic_ncols=True)
    try:
        return _loop(args, model_type, d, train_data, eval_data, sampler, model, optimizer, metrics, bar, total_steps,
                     warmup, peak_lr, autocast, is_ddp, start_epoch, start_step, global_step)
    finally:
        bar.close()
        metrics.close()


def _loop(args: TrainArgs, model_type: str, d: distributed.Dist, train_data: TokenizedSplit,
          eval_data: TokenizedSplit | None, sampler: MultipackSampler, model: Any, optimizer: torch.optim.Optimizer,
          metrics: "MetricsLog", bar: tqdm, total_steps: int, warmup: int, peak_lr: float, autocast: bool,
          is_ddp: bool, start_epoch: int, start_step: int, global_step: int) -> Path:
    last_saved: Path | None = None
    sparse_logits = accepts_logits_to_keep(model)
    model.train()
    done = global_step >= total_steps
    for epoch in range(start_epoch, args.epochs):
        if done:
            break
        steps = sampler.steps(epoch)
        pos = start_step if epoch == start_epoch else 0  # steps of this epoch done so far
        for s in range(pos, len(steps)):
            t0 = time.perf_counter()
            batches = rank_batches(train_data, steps[s], d, args.grad_accum)
            local_w = sum(float(b.weights.sum()) for b in batches)
            total_w = global_weight_sum(local_w, d.device)
            # The engines average gradients over ranks (and DeepSpeed over micro-steps); undo that so the
            # gradient is that of sum(w * CE) / sum(w) over the whole global batch.
            scale = d.world_size * (args.grad_accum if args.deepspeed is not None else 1)
            lr = lr_at(global_step, total_steps, warmup, peak_lr, args.lr_min_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for i, batch in enumerate(batches):
                last = i == len(batches) - 1
                sync = model.no_sync() if is_ddp and not last else contextlib.nullcontext()
                with sync:
                    part = forward_loss_sum(model, batch, d.device, autocast, sparse_logits)
                    loss = part / total_w.clamp(min=1e-12).to(part.dtype) * scale
                    if args.deepspeed is not None:
                        model.backward(loss)
                        model.step()
                    else:
                        loss.backward()
                loss_sum += float(part.detach())
            if args.deepspeed is None:
                grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                           args.max_grad_norm)
                grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                grad_norm = float(model.get_global_grad_norm() or 0.0)
            global_step += 1
            pos = s + 1
            tokens = distributed.all_reduce_sum(sum(b.num_tokens for b in batches), d.device)
            supervised = distributed.all_reduce_sum(supervised_tokens(batches), d.device)
            step_loss = distributed.all_reduce_sum(loss_sum, d.device) / max(float(total_w), 1e-12)
            dt = time.perf_counter() - t0
            conversations = sum(len(b) for b in steps[s])
            record = {"step": global_step, "epoch": epoch, "conversations": conversations, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens": int(tokens), "supervised_tokens": int(supervised), "tokens_per_s": tokens / dt}
            metrics.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:.0f}", refresh=False)

            done = global_step >= total_steps
            if not done and pos < len(steps) and args.state_every and global_step % args.state_every == 0:
                checkpoint.save_state(args.save, model, optimizer,
                                      {"epoch": epoch, "step_in_epoch": pos, "global_step": global_step}, d)
            if done:
                break

        if eval_data is not None and len(eval_data):
            eval_loss = evaluate(model, eval_data, args, d, autocast)
            metrics.write({"step": global_step, "epoch": epoch, "eval_loss": eval_loss})
            log(d, f"epoch {epoch}: eval loss {eval_loss:.4f}")
        epoch_finished = pos == len(steps)
        if (epoch + 1) % args.save_every == 0 or epoch == args.epochs - 1 or done:
            last_saved = checkpoint.epoch_dir(args.save, epoch)
            checkpoint.save_model(last_saved, model, args.model, model_type, d, args.to_json(), args.merge_lora, epoch)
            log(d, f"saved {last_saved}")
        next_pos = {"epoch": epoch + 1, "step_in_epoch": 0} if epoch_finished else {"epoch": epoch, "step_in_epoch": pos}
        checkpoint.save_state(args.save, model, optimizer, {**next_pos, "global_step": global_step}, d)
    if last_saved is None:  # resumed a run that had already finished
        last_saved = checkpoint.epoch_dir(args.save, args.epochs - 1)
    log(d, f"done: {global_step} steps; model {last_saved}, resumable state {args.save / checkpoint.STATE_DIR}, "
           f"metrics {args.save / 'metrics.jsonl'}")
    return last_saved
