"""A tiny model learns a small task; LoRA; bad input is refused with one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ochat.cli import main
from ochat.models.tokenizers import load_tokenizer
from ochat.templates.conversation import Conversation
from ochat.templates.encoder import ConversationEncoder
from training_data import NAMES, counting_conversations, make_small_model, write_conversations
from ochat.training.train import TrainArgs, train


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tiny_model_learns_counting_on_held_out_prompts(small_model, tmp_path):
    # Held-out prompts use names never seen in training: the model must generalise the template.
    write_conversations(small_model, tmp_path / "d.train.parquet", counting_conversations(200, 0, names=NAMES[:15]))
    held_out = counting_conversations(20, 1, names=NAMES[15:])
    write_conversations(small_model, tmp_path / "d.eval.parquet", held_out)
    ep = train(TrainArgs(model=small_model, data=str(tmp_path / "d"), save=tmp_path / "out", epochs=10,
                         batch_max_len=256, lr=3e-3, state_every=0, save_every=100, progress=False))
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(steps) >= 200 and len(evals) == 10
    assert evals[-1] < 0.1 * evals[0]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ep)).eval()
    tok = load_tokenizer(ep)
    enc = ConversationEncoder("opencoder", tok)
    correct = 0
    for conv in held_out:
        ids, _ = enc.encode_one(Conversation(items=conv.items[:1]), inference=True)
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=enc.eot_id,
                             pad_token_id=enc.eot_id)
        correct += tok.decode(out[0, len(ids):], skip_special_tokens=True).strip() == conv.items[1].content
    assert correct / len(held_out) >= 0.8  # chance: ~0 (4 exact numbers out of a 300-token vocabulary)


def test_lora_with_gradient_checkpointing_merges_into_plain_hf(small_model, tmp_path):
    write_conversations(small_model, tmp_path / "d.train.parquet", counting_conversations(40, 0))
    ep = train(TrainArgs(model=small_model, data=str(tmp_path / "d"), save=tmp_path / "out", epochs=1,
                         batch_max_len=256, lr=1e-2, max_steps=3, lora_r=4, merge_lora=True, progress=False,
                         gradient_checkpointing=True))
    from transformers import AutoModelForCausalLM

    assert not (ep / "adapter_config.json").exists()
    merged, base = load_file(ep / "model.safetensors"), load_file(small_model / "model.safetensors")
    assert merged.keys() == base.keys()  # no lora_A / lora_B: a plain model
    assert any(not torch.equal(merged[k], base[k]) for k in base)
    AutoModelForCausalLM.from_pretrained(str(ep))
    meta = json.loads((ep / "ochat.json").read_text())
    assert meta["model_type"] == "opencoder" and meta["training"]["lora_r"] == 4


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def test_refuses_data_for_another_model_type_or_tokenizer(small_model, tmp_path, capsys):
    other_type = make_small_model(tmp_path / "other_type", model_type="openchat_3.6")
    other_tok = make_small_model(tmp_path / "other_tok", vocab_size=280)
    convs = counting_conversations(10, 0)
    write_conversations(other_type, tmp_path / "a.train.parquet", convs)
    write_conversations(other_tok, tmp_path / "b.train.parquet", convs)
    fp = load_tokenizer(small_model)
    from ochat.models.tokenizers import tokenizer_fingerprint

    mine = tokenizer_fingerprint(fp)
    for prefix, their_type, their_model in (("a", "openchat_3.6", other_type), ("b", "opencoder", other_tok)):
        code, err = run_cli(["train", "--model", str(small_model), "--data", str(tmp_path / prefix),
                             "--save", str(tmp_path / f"out_{prefix}"), "--no-progress"], capsys)
        theirs = tokenizer_fingerprint(load_tokenizer(their_model))
        assert code == 2
        line = err.strip().splitlines()[-1]
        assert line.startswith("error: ") and f"{prefix}.train.parquet" in line
        assert f"'{their_type}'" in line and "'opencoder'" in line and theirs in line and mine in line
        assert "Traceback" not in err
        assert not (tmp_path / f"out_{prefix}" / "ep_0").exists()


def test_overlong_conversation_truncated_with_count_or_refused_with_strict(small_model, tmp_path, capsys):
    convs = counting_conversations(30, 0)
    long = Conversation.model_validate({"items": [{"role": "user", "content": "count " * 200},
                                                  {"role": "assistant", "content": "1 2 3 " * 50}]})
    write_conversations(small_model, tmp_path / "d.train.parquet", convs + [long])
    base = ["train", "--model", str(small_model), "--data", str(tmp_path / "d"), "--batch-max-len", "128",
            "--epochs", "1", "--max-steps", "2", "--no-progress", "--state-every", "0"]
    code, err = run_cli(base + ["--save", str(tmp_path / "ok")], capsys)
    assert code == 0, err
    assert "truncated 1 conversation(s) longer than --batch-max-len 128" in err
    assert (tmp_path / "ok" / "ep_0" / "model.safetensors").exists()

    code, err = run_cli(base + ["--save", str(tmp_path / "strict"), "--strict"], capsys)
    assert code == 2
    assert "conversation id '30'" in err and "> --batch-max-len 128" in err and "Traceback" not in err


def test_existing_save_dir_needs_resume_or_overwrite(small_model, tmp_path, capsys):
    (tmp_path / "out" / "ep_0").mkdir(parents=True)
    write_conversations(small_model, tmp_path / "d.train.parquet", counting_conversations(10, 0))
    code, err = run_cli(["train", "--model", str(small_model), "--data", str(tmp_path / "d"), "--save",
                         str(tmp_path / "out")], capsys)
    assert code == 2 and "--resume" in err and "Traceback" not in err
    code, err = run_cli(["train", "--model", str(Path(tmp_path / "missing")), "--data", str(tmp_path / "d"),
                         "--save", str(tmp_path / "o2")], capsys)
    assert code == 2 and "missing" in err


def test_real_tokenizer_tiny_model_trains_and_saves_servable_checkpoint(tiny_model, small_model, tmp_path, capsys):
    """The project's tiny model (Mistral tokenizer, openchat_3.5): a short run, an HF checkpoint with the
    chat template; its data is refused by a model of another type and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_conversations(tiny_model, tmp_path / "d.train.parquet", counting_conversations(8, 0))
    ep = train(TrainArgs(model=tiny_model, data=str(tmp_path / "d"), save=tmp_path / "out", epochs=1,
                         batch_max_len=128, lr=1e-3, max_steps=2, progress=False))
    AutoModelForCausalLM.from_pretrained(str(ep))
    tok = AutoTokenizer.from_pretrained(str(ep))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("GPT4 Correct Assistant:")
    assert json.loads((ep / "ochat.json").read_text())["model_type"] == "openchat_3.5"

    code, err = run_cli(["train", "--model", str(small_model), "--data", str(tmp_path / "d"),
                         "--save", str(tmp_path / "refused")], capsys)
    assert code == 2 and "'openchat_3.5'" in err and "'opencoder'" in err


def test_eval_every_keeps_the_best_checkpoint_and_stops_early(small_model, tmp_path):
    """--eval-every 2 logs eval losses between epoch ends; --save-best keeps the lowest one's weights as
    SAVE/best; a learning rate far too high makes the eval loss worse, and patience 2 stops the run."""
    write_conversations(small_model, tmp_path / "d.train.parquet", counting_conversations(60, 0))
    write_conversations(small_model, tmp_path / "d.eval.parquet", counting_conversations(8, 1))
    ep = train(TrainArgs(model=small_model, data=str(tmp_path / "d"), save=tmp_path / "out", epochs=3,
                         batch_max_len=128, lr=0.5, warmup_ratio=0.0, eval_every=2, save_best=True,
                         early_stop_patience=2, state_every=0, progress=False))
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    assert [s for s, _ in evals] == list(range(2, 2 * len(evals) + 1, 2))  # every 2 steps, no epoch end yet
    losses = [loss for _, loss in evals]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert best == len(losses) - 3 and all(loss >= losses[best] for loss in losses[best + 1:])  # patience 2
    assert steps == list(range(1, evals[-1][0] + 1))  # stopped right after the last evaluation
    meta = json.loads((tmp_path / "out" / "best" / "ochat.json").read_text())
    assert meta["training"]["step"] == evals[best][0] and meta["training"]["eval_loss"] == losses[best]
    assert ep == tmp_path / "out" / "ep_0"
    best_w, last_w = load_file(tmp_path / "out" / "best" / "model.safetensors"), load_file(ep / "model.safetensors")
    assert any(not torch.equal(best_w[k], last_w[k]) for k in best_w)
