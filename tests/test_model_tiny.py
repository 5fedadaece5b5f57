import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from ochat.models.model_dir import read_ochat_json


def test_tiny_model_loads_offline_and_generates(tiny_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert read_ochat_json(tiny_model)["model_type"] == "openchat_3.5"
    eot = tok.convert_tokens_to_ids("<|end_of_turn|>")
    assert eot == 32000 and model.config.vocab_size == len(tok) == 32001
    assert GenerationConfig.from_pretrained(tiny_model).eos_token_id == eot
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert torch.isfinite(model(ids).logits).all()


def test_tiny_cli_archs_and_errors(tmp_path, capsys):
    from ochat.cli import main

    # one real subprocess for the console entry point; the rest in-process (same code, no 5 s import each)
    r = subprocess.run([sys.executable, "-m", "ochat", "model", "tiny", "--out", str(tmp_path / "llama"),
                        "--arch", "llama", "--model-type", "openchat_v3.2", "--hidden-size", "32", "--layers", "1",
                        "--heads", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["max_position_embeddings"] == 4096 and cfg["hidden_size"] == 32
    assert main(["model", "tiny", "--out", str(tmp_path / "coder"), "--arch", "gpt_bigcode", "--model-type",
                 "opencoder", "--hidden-size", "32", "--layers", "1", "--heads", "2"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "coder").config.model_type == "gpt_bigcode"
    # an existing --out, an unknown type, a bad tokenizer dir: one line, exit 2, nothing written
    capsys.readouterr()
    for args, msg in [(["--out", str(tmp_path / "llama")], "already exists"),
                      (["--out", str(tmp_path / "x"), "--model-type", "gpt9"], "unknown model type"),
                      (["--out", str(tmp_path / "y"), "--tokenizer", str(tmp_path / "nope")], "not a directory")]:
        assert main(["model", "tiny", *args]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
