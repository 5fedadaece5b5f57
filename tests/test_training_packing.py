"""Packing: one packed row gives exactly the per-conversation losses; the multipack sampler's contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ochat.training.loss import weighted_ce_sum
from ochat.training.multipack import MultipackSampler
from ochat.training.packing import pack
from ochat.synthetic.token_rows import sharegpt_like_lengths


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def conversations(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens, weights = [], []
    for n in (7, 19, 3, 30, 12):
        tokens.append(rng.integers(0, vocab, n))
        w = np.zeros(n, dtype=np.float32)
        w[n // 2:] = rng.choice([1.0, 0.1], size=n - n // 2)  # C-RLFT class weights on the "answer"
        weights.append(w)
    return tokens, weights


def one_by_one(model, tokens, weights) -> list[tuple[float, float]]:
    """(sum w*CE, sum w) of each conversation run alone, no packing, no position ids."""
    out = []
    for t, w in zip(tokens, weights):
        b = pack([t], [w])
        logits = model(input_ids=b.input_ids, use_cache=False).logits
        out.append((float(weighted_ce_sum(logits, b.labels, b.weights)), float(b.weights.sum())))
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager", "ochat_varlen_sdpa"])
def test_packed_loss_equals_per_conversation_losses(small_model, attn):
    from transformers import AutoModelForCausalLM

    from ochat.training import varlen

    varlen.register()
    model = AutoModelForCausalLM.from_pretrained(str(small_model), dtype=torch.float64, attn_implementation=attn).eval()
    tokens, weights = conversations(model.config.vocab_size)
    with torch.no_grad():
        alone = one_by_one(model, tokens, weights)
        packed = pack(tokens, weights)
        assert packed.position_ids[0].tolist()[:8] == [0, 1, 2, 3, 4, 5, 6, 0]
        logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
        packed_loss = float(weighted_ce_sum(logits, packed.labels, packed.weights) / packed.weights.sum())

        # C-RLFT normalises by the weight sum of the whole batch: the weight-sum-weighted mean of the
        # per-conversation losses (the plain mean when every conversation carries the same weight).
        expected = sum(s for s, _ in alone) / sum(w for _, w in alone)
        assert packed_loss == pytest.approx(expected, rel=1e-6)

        # Same weights on every conversation: the plain mean of per-conversation losses.
        ones = [np.ones(len(t), dtype=np.float32) for t in tokens]
        alone1 = one_by_one(model, tokens, ones)
        p1 = pack(tokens, ones)
        lg1 = model(input_ids=p1.input_ids, position_ids=p1.position_ids, use_cache=False).logits
        per_token_packed = float(weighted_ce_sum(lg1, p1.labels, p1.weights) / p1.weights.sum())
        assert per_token_packed == pytest.approx(sum(s for s, _ in alone1) / sum(w for _, w in alone1), rel=1e-6)
        equal_w = [np.full(len(t), 1.0 / (len(t) - 1), dtype=np.float64) for t in tokens]
        alone_eq = one_by_one(model, tokens, equal_w)
        pe = pack(tokens, equal_w)
        lge = model(input_ids=pe.input_ids, position_ids=pe.position_ids, use_cache=False).logits
        packed_eq = float(weighted_ce_sum(lge, pe.labels, pe.weights) / pe.weights.sum())
        mean_of_losses = float(np.mean([s / w for s, w in alone_eq]))
        assert packed_eq == pytest.approx(mean_of_losses, rel=1e-6)

        # The check can fail: one position-id run over the whole row lets attention cross conversations.
        no_restart = torch.arange(packed.num_tokens)[None]
        leaked = model(input_ids=packed.input_ids, position_ids=no_restart, use_cache=False).logits
        leaked_loss = float(weighted_ce_sum(leaked, packed.labels, packed.weights) / packed.weights.sum())
        assert abs(leaked_loss - expected) > 1e-4
        # ... and so would a KV cache, which turns transformers' packed-sequence detection off.
        if attn != "ochat_varlen_sdpa":
            cached = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=True).logits
            cached_loss = float(weighted_ce_sum(cached, packed.labels, packed.weights) / packed.weights.sum())
            assert abs(cached_loss - expected) > 1e-4


def test_sampler_bins_fit_and_are_deterministic():
    lengths = sharegpt_like_lengths(3000, seed=1, max_len=1024)
    a = MultipackSampler(lengths, batch_max_len=4096, bins_per_step=4, seed=7)
    b = MultipackSampler(lengths, batch_max_len=4096, bins_per_step=4, seed=7)
    steps = a.steps(0)
    assert steps == b.steps(0)                       # deterministic for (seed, epoch)
    assert steps != a.steps(1)                       # reshuffled each epoch
    assert all(len(step) == 4 for step in steps)     # one bin per rank (x grad accum) per step
    assert all(lengths[bin_].sum() <= 4096 for step in steps for bin_ in step)
    seen = [i for step in steps for bin_ in step for i in bin_]
    assert len(seen) == len(set(seen))               # no conversation twice in an epoch
    assert len(seen) + a.dropped(0) == len(lengths)
    assert a.efficiency(0) >= 0.98                   # the goal on ShareGPT-like lengths


def test_steps_come_in_random_order_not_longest_first():
    """The issue's case: lengths with a long tail at the cap, one row of 8,192 tokens per step. Packing
    emits bins longest-first; the steps must not follow that order (no length curriculum)."""
    lengths = sharegpt_like_lengths(1500, seed=3, median=777, sigma=1.5, max_len=8191)
    assert (lengths == 8191).mean() > 0.04
    sampler = MultipackSampler(lengths, batch_max_len=8192, bins_per_step=1, seed=0)
    steps = sampler.steps(0)
    longest = np.array([lengths[step[0]].max() for step in steps])
    ranks = np.argsort(np.argsort(-longest, kind="stable"), kind="stable")
    rho = np.corrcoef(np.arange(len(steps)), ranks)[0, 1]   # Spearman: 1.0 when sorted longest first
    assert abs(rho) < 0.2, rho
    assert (longest[:20] == 8191).mean() < 0.5               # before: every one of the first steps
    assert sorted(longest.tolist(), reverse=True) != longest.tolist()
    assert sampler.efficiency(0) >= 0.98
    # The order depends on (lengths, budget, bins per step, seed, epoch) only: 2 ranks x 2 rows = 1 x 4.
    assert MultipackSampler(lengths, 8192, 4, 0).steps(1) == MultipackSampler(lengths, 8192, 2 * 2, 0).steps(1)


def test_lr_schedule_warmup_then_cosine_to_floor():
    from ochat.training.train import lr_at

    lrs = [lr_at(s, total=100, warmup=10, peak=1e-3, min_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))          # non-increasing after warmup
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)                 # cosine ends at min_ratio x peak


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt_bigcode"])
def test_attention_chosen_for_each_architecture_keeps_conversations_apart(arch):
    from transformers import AutoModelForCausalLM

    from ochat.models.tiny import tiny_config
    from ochat.training.loss import chunked_lm_head
    from ochat.training.train import Forward, accepts_logits_to_keep, attention_implementation

    torch.manual_seed(0)
    config = tiny_config(arch, vocab_size=200, max_positions=256, hidden_size=32, layers=2, heads=4)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention_implementation(arch, gpu=False))
    model = model.double().eval()
    tokens, weights = conversations(200, seed=1)
    with torch.no_grad():
        alone = one_by_one(model, tokens, weights)
        packed = pack(tokens, weights)
        logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
        total = float(weighted_ce_sum(logits, packed.labels, packed.weights))
        # The training forward projects only supervised positions onto the vocabulary: same loss.
        assert accepts_logits_to_keep(model)
        sparse = float(Forward(True, None, 0, autocast=False)(model, packed, torch.device("cpu")))
        # ... and the lm head computes the cross-entropy in chunks of 3 positions: same loss again.
        head = chunked_lm_head(model)
        assert head is not None
        chunked = float(Forward(True, head, 3, autocast=False)(model, packed, torch.device("cpu")))
    assert total == pytest.approx(sum(s for s, _ in alone), rel=1e-6)
    assert sparse == pytest.approx(total, rel=1e-9)
    assert chunked == pytest.approx(total, rel=1e-9)


def test_chunked_cross_entropy_same_loss_and_gradients_with_logits_bounded_by_a_chunk(small_model):
    """fp32, as training runs on CPU: same loss to 1e-6 and same gradients as materialising all the logits,
    and no tensor of more than `chunk` rows of the vocabulary is ever made (forward or backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoModelForCausalLM

    from ochat.training.loss import chunked_lm_head
    from ochat.training.train import Forward

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(small_model))
    vocab, hidden, chunk = config.vocab_size, config.hidden_size, 5
    tokens, weights = conversations(vocab, seed=2)
    batch = pack(tokens, weights)

    def loss_and_grads(chunked: bool):
        model = AutoModelForCausalLM.from_pretrained(str(small_model), dtype=torch.float32)
        forward = Forward(True, chunked_lm_head(model) if chunked else None, chunk, autocast=False)
        loss = forward(model, batch, torch.device("cpu"))
        loss.backward()
        return float(loss.detach()), {n: p.grad for n, p in model.named_parameters()}

    class LargestLogits(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                # [*, vocab] tensors, the lm head's weight (vocab x hidden, or its transpose) aside
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == vocab and t.numel() != vocab * hidden:
                    self.rows = max(self.rows, t.numel() // vocab)
            return out

    with LargestLogits() as plain_watch:
        plain_loss, plain_grads = loss_and_grads(False)
    with LargestLogits() as watch:
        loss, grads = loss_and_grads(True)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for name, g in plain_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6)
    supervised = int((batch.labels != -100).sum())
    assert plain_watch.rows == supervised > 4 * chunk      # all the supervised positions' logits at once
    assert watch.rows == chunk
