"""GPU check of the training step: a ~1B random Llama, bf16 autocast, packed 16K-token rows, per-conversation
attention, gradient checkpointing off and on. Reports tokens/s, MFU and peak memory (JSON on stdout).

    python benchmarks/train_gpu_1b.py                  # H100/H200: ~2-4 min (50 measured steps x 2)
    python benchmarks/train_gpu_1b.py --tiny --steps 3 # CPU smoke test (tests/test_training_gpu_script.py)

The step is ochat's own: `Forward` (supervised positions only, chunked lm-head cross-entropy), the
`TorchEngine` (clipping, AdamW fused on CUDA), fp32 master weights with bf16 autocast, as `ochat train`
runs on one GPU. Attention: FlashAttention-2 varlen if `flash_attn` is installed, else torch's own varlen
kernel (`torch.nn.attention.varlen`, CUDA), else ochat's per-conversation sdpa. MFU counts model FLOPs
(6 x parameters x tokens + causal attention 6 x layers x hidden x sum(L_i^2)), not the recomputation of
gradient checkpointing, against --peak-tflops (H100/H200 SXM dense bf16: 989). With --trl and trl
installed, TRL's SFTTrainer (packing bfd) runs the same model and rows for --trl-steps steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from ochat.models.tiny import tiny_config
from ochat.synthetic.token_rows import random_token_rows, sharegpt_like_lengths
from ochat.training import varlen
from ochat.training.distributed import TorchEngine
from ochat.training.loss import chunked_lm_head
from ochat.training.multipack import MultipackSampler
from ochat.training.packing import pack
from ochat.training.train import Forward, accepts_logits_to_keep, flash_attn_available

SHAPES = {  # TinyLlama-1.1B's shape; a toy for the CPU smoke test
    "1b": dict(hidden_size=2048, layers=22, heads=32, kv_heads=4, intermediate_size=5632, vocab_size=32000),
    "tiny": dict(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128, vocab_size=512),
}


def pick_attention(device: torch.device) -> str:
    if device.type != "cuda":
        return varlen.register()
    if flash_attn_available():
        return "flash_attention_2"
    try:  # probe torch's varlen kernel once on this GPU
        from torch.nn.attention.varlen import varlen_attn

        q = torch.randn(8, 2, 64, device=device, dtype=torch.bfloat16)
        cu = torch.tensor([0, 3, 8], device=device, dtype=torch.int32)
        varlen_attn(q, q, q, cu, cu, 5, 5, window_size=(-1, 0))
        return varlen.register_torch_varlen()
    except Exception as e:  # noqa: BLE001 - any failure means: not on this torch / GPU
        print(f"torch varlen attention unavailable ({type(e).__name__}: {e}); using ochat_varlen_sdpa", file=sys.stderr)
        return varlen.register()


def llama_config(shape: dict, row_len: int):
    return tiny_config("llama", vocab_size=shape["vocab_size"], max_positions=row_len, hidden_size=shape["hidden_size"],
                       layers=shape["layers"], heads=shape["heads"], kv_heads=shape["kv_heads"],
                       intermediate_size=shape["intermediate_size"])


def model_flops(n_params: int, layers: int, hidden: int, rows: list[list[int]], lengths: np.ndarray) -> float:
    tokens = sum(int(lengths[i]) for row in rows for i in row)
    attention = 6 * layers * hidden * sum(int(lengths[i]) ** 2 for row in rows for i in row)
    return 6 * n_params * tokens + attention


def run(shape: dict, row_len: int, steps: int, warmup: int, checkpointing: bool, attn: str, device: torch.device,
        data: tuple, peak_tflops: float) -> dict:
    from transformers import AutoModelForCausalLM

    tokens, weights, lengths, bins = data
    torch.manual_seed(0)
    config = llama_config(shape, row_len)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).to(device)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(p.numel() for p in model.parameters())
    gpu = device.type == "cuda"
    forward = Forward(accepts_logits_to_keep(model), chunked_lm_head(model), 4096, autocast=gpu)
    engine = TorchEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=gpu), 1)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    seconds, done_tokens, flops = 0.0, 0, 0.0
    for s in range(warmup + steps):
        row = bins[s % len(bins)]
        batch = pack([tokens[i] for i in row], [weights[i] for i in row])
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = forward(engine.model, batch, device) / batch.weights.sum().clamp(min=1)
        engine.backward(loss)
        engine.step(1.0)
        if gpu:
            torch.cuda.synchronize()
        if s >= warmup:
            seconds += time.perf_counter() - t0
            done_tokens += batch.num_tokens
            flops += model_flops(n_params, shape["layers"], shape["hidden_size"], [row], lengths)
    result = {"gradient_checkpointing": checkpointing, "attention": attn, "params": n_params, "steps": steps,
              "row_tokens": row_len, "tokens_per_s": round(done_tokens / seconds, 1),
              "seconds_per_step": round(seconds / steps, 4), "final_loss": round(float(loss.detach()), 4)}
    if gpu:
        result["mfu"] = round(flops / seconds / (peak_tflops * 1e12), 4)
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del model, engine
    if gpu:
        torch.cuda.empty_cache()
    return result


def trl_peer(shape: dict, data: tuple, row_len: int, steps: int, device: torch.device) -> dict:
    try:
        import trl  # noqa: F401
    except ImportError:
        return {"skipped": "trl is not installed"}
    import tempfile

    from transformers import AutoModelForCausalLM

    from ochat.training.bench_trl import make_trl_contender

    tokens, weights, _, _ = data
    torch.manual_seed(0)
    config = llama_config(shape, row_len)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)
    peer = make_trl_contender(base, tokens, weights, row_len, 0, device, tempfile.mkdtemp(prefix="ochat-trl-"))
    del base
    peer.run(0.0, device, False)          # a warm-up round of 2 steps
    peer.trainer.args.max_steps = steps + 1
    peer.trainer.step_timer.start_round()
    peer.trainer.train()
    rows = peer.trainer.step_timer.rows[1:]
    return {"method": peer.name, "steps": len(rows), "tokens_per_s": round(sum(t for _, _, t in rows) / sum(s for s, _, _ in rows), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="toy model and rows (CPU smoke test)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--row-len", type=int, default=16384)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--trl", action="store_true", help="also TRL's SFTTrainer (if trl is installed)")
    p.add_argument("--trl-steps", type=int, default=10)
    args = p.parse_args(argv)
    shape = SHAPES["tiny" if args.tiny else "1b"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lengths = sharegpt_like_lengths(200 if args.tiny else 4000, seed=0, median=600, max_len=min(8192, args.row_len))
    tokens, weights = random_token_rows(lengths, shape["vocab_size"], seed=0)
    bins = [step[0] for step in MultipackSampler(lengths, args.row_len, 1, seed=0).steps(0)]
    data = (tokens, weights, lengths, bins)
    attn = pick_attention(device)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, attention {attn}, "
          f"{len(bins)} packed rows of <= {args.row_len} tokens", file=sys.stderr)
    results = [run(shape, args.row_len, args.steps, args.warmup, gc, attn, device, data, args.peak_tflops)
               for gc in (False, True)]
    for r in results:
        print(json.dumps(r), file=sys.stderr)
    out = {"device": str(device), "results": results}
    if args.trl:
        out["trl"] = trl_peer(shape, data, args.row_len, args.trl_steps, device)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
