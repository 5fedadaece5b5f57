"""`ochat model add-eot / extend-context / make-delta / apply-delta` on tiny models made here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_templates import HELLO_IDS
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from ochat.errors import OchatError
from ochat.models.checkpoint import Checkpoint
from ochat.models.delta import apply_delta, make_delta
from ochat.models.model_dir import read_ochat_json
from ochat.models.tiny import make_tiny_model, tiny_config
from ochat.models.tokenizers import load_tokenizer, save_tokenizer
from ochat.models.tools import add_eot, extend_context

EOT = "<|end_of_turn|>"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def plain_model(out: Path, tokenizer_dir, arch: str, max_positions: int = 64, seed: int = 0,
                dtype=torch.float32, max_shard_size: str = "50MB") -> Path:
    """A Hugging Face model dir as a hub would ship it: no ochat tokens, no chat_template, no ochat.json."""
    tok = load_tokenizer(tokenizer_dir)
    cfg = tiny_config(arch, vocab_size=len(tok), max_positions=max_positions, hidden_size=32, layers=1, heads=2,
                      bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    save_tokenizer(tok, out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, _mistral_tokenizer):
    root = tmp_path_factory.mktemp("tools")
    save_tokenizer(_mistral_tokenizer, root / "mistral-tok")  # the raw Mistral-7B tokenizer, no end-of-turn
    base = plain_model(root / "base", root / "mistral-tok", "mistral", max_shard_size="3MB")  # several shards
    eot = add_eot(base, root / "eot")["out"]
    return {"root": root, "tok": root / "mistral-tok", "base": base, "eot": eot}


def test_add_eot_mean_rows_chat_template_and_old_logits(models):
    base, eot = models["base"], models["eot"]
    tok = AutoTokenizer.from_pretrained(eot)
    before = AutoModelForCausalLM.from_pretrained(base)
    after = AutoModelForCausalLM.from_pretrained(eot)
    assert tok.convert_tokens_to_ids(EOT) == 32000 and len(tok) == after.config.vocab_size == 32001
    assert read_ochat_json(eot)["model_type"] == "openchat_3.5"  # the default type
    assert GenerationConfig.from_pretrained(eot).eos_token_id == 32000 == after.config.eos_token_id
    for old, new in [(before.get_input_embeddings().weight, after.get_input_embeddings().weight),
                     (before.get_output_embeddings().weight, after.get_output_embeddings().weight)]:
        assert torch.equal(new[:32000], old)
        torch.testing.assert_close(new[32000], old.mean(dim=0), rtol=0, atol=1e-7)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    assert list(ids) == HELLO_IDS
    old_ids = torch.tensor([[1, 420, 6316, 28781, 22557, 1247]])
    with torch.no_grad():
        torch.testing.assert_close(after(old_ids).logits[..., :32000], before(old_ids).logits, rtol=0, atol=1e-6)


def test_add_eot_starcoder_normal_init_and_type_from_ochat_json(tmp_path, bytelevel_tokenizer_dir):
    base = plain_model(tmp_path / "coder", bytelevel_tokenizer_dir, "gpt_bigcode")
    (base / "ochat.json").write_text(json.dumps({"model_type": "opencoder"}))
    r = add_eot(base, tmp_path / "out", seed=1)
    assert (r["model_type"], r["init"], r["added"]) == ("opencoder", "normal", [EOT])
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    eot_id = tok.convert_tokens_to_ids(EOT)
    old = AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().weight
    row = model.get_input_embeddings().weight[eot_id]
    assert 0.01 < row.std().item() < 0.04 and not torch.allclose(row, old.mean(dim=0), atol=1e-3)
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False) \
        == f"User:Hi{EOT}Assistant:"  # opencoder: pieces joined as tokens, no space
    # --init mean overrides the StarCoder default
    r = add_eot(base, tmp_path / "mean", init="mean")
    w = AutoModelForCausalLM.from_pretrained(tmp_path / "mean").get_input_embeddings().weight
    torch.testing.assert_close(w[eot_id], old.mean(dim=0), rtol=0, atol=1e-7)


def _fine_tune(src: Path, out: Path, dtype=torch.float32) -> Path:
    """A stand-in for a fine-tuned model: every weight moved a little, saved in several shards."""
    model = AutoModelForCausalLM.from_pretrained(src).to(dtype)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(str(out), max_shard_size="1MB")
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "ochat", "generation")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_delta_round_trip_is_exact_in_both_modes(models, tmp_path, dtype):
    base = models["base"] if dtype == torch.float32 else plain_model(tmp_path / "base16", models["tok"], "mistral",
                                                                     dtype=dtype, max_shard_size="1MB")
    target = _fine_tune(models["eot"], tmp_path / "target", dtype)  # vocab 32001 > base 32000
    r = make_delta(base, target, tmp_path / "delta", max_shard_size="2MB")
    assert r["inexact"] == 0 and r["files"] > 1
    assert (tmp_path / "delta" / "model.safetensors.index.json").exists()
    assert AutoTokenizer.from_pretrained(tmp_path / "delta").convert_tokens_to_ids(EOT) == 32000
    with Checkpoint(target) as T, Checkpoint(tmp_path / "delta") as D:
        # rows beyond the base vocabulary are stored as the target's own (FastChat's rule)
        name = "model.embed_tokens.weight"
        assert torch.equal(D.get(name)[32000:].to(dtype), T.get(name)[32000:])
        assert not torch.equal(D.get(name)[:32000].to(dtype), T.get(name)[:32000])
        want = {n: T.get(n) for n in T.names()}
    if dtype == torch.float32:
        assert len(Checkpoint(base).files) > 1  # low-memory mode reads a sharded base
    for low_memory in (False, True):
        out = apply_delta(base, tmp_path / "delta", tmp_path / f"out-{low_memory}", low_memory=low_memory,
                          max_shard_size="1MB")["out"]
        with Checkpoint(out) as O:
            assert len(O.files) > 1 and sorted(O.names()) == sorted(want)
            for n, t in want.items():
                got = O.get(n)
                assert got.dtype == t.dtype and torch.equal(got, t), n
        assert not (out / "ochat_delta.json").exists()
        assert read_ochat_json(out)["model_type"] == "openchat_3.5"
        model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
        assert model.dtype == dtype and model.config.vocab_size == 32001


def test_apply_a_fastchat_delta(models, tmp_path):
    """A FastChat delta: a plain model dir of fp16 target - base (new vocabulary rows: the target's), no manifest."""
    from safetensors.torch import save_file

    target = _fine_tune(models["eot"], tmp_path / "target")
    delta = tmp_path / "fastchat-delta"
    delta.mkdir()
    with Checkpoint(models["base"]) as B, Checkpoint(target) as T:
        tensors = {}
        for n in T.names():
            d = T.get(n).clone()
            d[: B.shape(n)[0]] -= B.get(n)
            tensors[n] = d.half()
        want = {n: T.get(n) for n in T.names()}
    save_file(tensors, str(delta / "model.safetensors"), metadata={"format": "pt"})
    for f in target.iterdir():
        if not f.name.endswith((".safetensors", ".json")) or f.name in ("config.json", "tokenizer_config.json"):
            (delta / f.name).write_bytes(f.read_bytes())
    out = apply_delta(models["base"], delta, tmp_path / "out", low_memory=True)["out"]
    with Checkpoint(out) as O:
        for n, t in want.items():  # fp16 deltas are approximate, as Vicuna's were
            torch.testing.assert_close(O.get(n).float(), t, rtol=0, atol=1e-4)


def test_extend_context_extrapolate_and_linear(models, tmp_path):
    src = models["eot"]
    r = extend_context(src, tmp_path / "ext", 128)
    assert (r["from"], r["to"]) == (64, 128)
    cfg = json.loads((tmp_path / "ext" / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 128 and cfg["rope_parameters"]["rope_type"] == "default"
    assert (tmp_path / "ext" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    lin = extend_context(src, tmp_path / "lin", 256, rope_scaling="linear")
    ids = torch.randint(0, 32000, (1, 100))  # longer than the old limit of 64
    logits = {}
    for name in ("ext", "lin"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        with torch.no_grad():
            logits[name] = model(ids).logits
        assert logits[name].shape == (1, 100, 32001) and torch.isfinite(logits[name]).all()
    assert lin["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "lin").config.rope_parameters["factor"] == 4.0
    assert not torch.allclose(logits["ext"], logits["lin"])  # the scaling is in effect
    assert read_ochat_json(tmp_path / "lin")["max_context"] == 256


def test_extend_context_openchat_becomes_openchat_8192(models, tmp_path):
    small = make_tiny_model(tmp_path / "v1", models["tok"], "openchat", arch="llama", hidden_size=32, layers=1,
                            heads=2)
    extend_context(small, tmp_path / "v1-8192", 8192)
    assert read_ochat_json(tmp_path / "v1-8192")["model_type"] == "openchat_8192"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "v1-8192").config.max_position_embeddings == 8192


def test_extend_context_gpt_bigcode_interpolates_learned_positions(tmp_path, bytelevel_tokenizer_dir):
    src = plain_model(tmp_path / "coder", bytelevel_tokenizer_dir, "gpt_bigcode", max_positions=32)
    with pytest.raises(OchatError, match="nothing to extrapolate"):
        extend_context(src, tmp_path / "none", 64)
    assert not (tmp_path / "none").exists()
    extend_context(src, tmp_path / "lin", 64, rope_scaling="linear")
    old = AutoModelForCausalLM.from_pretrained(src).transformer.wpe.weight
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lin")
    new = model.transformer.wpe.weight
    assert model.config.n_positions == 64 and new.shape == (64, 32)
    torch.testing.assert_close(new[0], old[0])
    torch.testing.assert_close(new[-1], old[-1])
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 300, (1, 50))).logits).all()


def _ochat(*args):
    return subprocess.run([sys.executable, "-m", "ochat", "model", *args], capture_output=True, text=True)


def _assert_one_line_error(code, stderr, msg, out: Path):
    assert code == 2 and msg in stderr and stderr.strip().count("\n") == 0, stderr
    assert stderr.startswith("error: ") and not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp dir left


@pytest.fixture(scope="module")
def bad(models):
    """A delta made from the 32000-row base, and a base with the same shapes but other weights."""
    root = models["root"]
    make_delta(models["base"], models["eot"], root / "delta")
    plain_model(root / "other", models["tok"], "mistral", seed=5)
    (root / "empty").mkdir()
    return root


def test_bad_input_exit_2_in_a_subprocess(models, bad, tmp_path):
    """The issue's four cases through `python -m ochat`; paths and names are checked before torch is imported."""
    base, eot = str(models["base"]), str(models["eot"])
    cases = [
        (["add-eot", "--model", str(bad / "empty")], "not a model directory"),
        (["add-eot", "--model", base, "--model-type", "gpt9"], "unknown model type"),
        (["apply-delta", "--base", eot, "--delta", str(bad / "delta")], "vocab mismatch"),  # after loading weights
    ]
    for i, (args, msg) in enumerate(cases):
        r = _ochat(*args, "--out", str(tmp_path / f"out{i}"))
        _assert_one_line_error(r.returncode, r.stderr, msg, tmp_path / f"out{i}")
    r = _ochat("add-eot", "--model", base, "--out", eot)  # an existing --out is never touched
    assert r.returncode == 2 and "already exists" in r.stderr and (Path(eot) / "model.safetensors").exists()


@pytest.mark.parametrize("args, msg", [
    (["add-eot", "--model", "{base}", "--init", "zeros"], "--init zeros"),
    (["extend-context", "--model", "{base}", "--rope-scaling", "ntk"], "--rope-scaling ntk"),
    (["make-delta", "--base", "{bad}/nope", "--target", "{eot}"], "not a directory"),
    (["apply-delta", "--base", "{base}", "--delta", "{bad}/empty"], "not a model directory"),
    (["apply-delta", "--base", "{eot}", "--delta", "{bad}/delta", "--low-memory"], "vocab mismatch"),
    (["apply-delta", "--base", "{bad}/other", "--delta", "{bad}/delta"], "differ from the base"),
    (["apply-delta", "--base", "{bad}/other", "--delta", "{bad}/delta", "--low-memory"], "differ from the base"),
    (["make-delta", "--base", "{coder}", "--target", "{eot}"], "has no tensor"),
    (["extend-context", "--model", "{base}", "--max-position-embeddings", "32"], "must exceed"),
    (["extend-context", "--model", "{coder}", "--max-position-embeddings", "64"], "nothing to extrapolate"),
])
def test_bad_models_exit_2_one_line(models, bad, tmp_path, capsys, bytelevel_tokenizer_dir, args, msg):
    """The same `ochat.cli.main` as `python -m ochat`, in this process (no 5 s torch import per case)."""
    from ochat.cli import main

    coder = models["root"] / "coder"
    if not coder.exists():
        plain_model(coder, bytelevel_tokenizer_dir, "gpt_bigcode", max_positions=32)
    paths = {"eot": models["eot"], "base": models["base"], "bad": bad, "coder": coder}
    out = tmp_path / "out"
    capsys.readouterr()  # fixture output
    code = main(["model", *[a.format(**paths) for a in args], "--out", str(out)])
    _assert_one_line_error(code, capsys.readouterr().err, msg, out)
