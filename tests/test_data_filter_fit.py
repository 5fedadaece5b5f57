"""Model-label filter, C-RLFT condition map, fit to context (truncate / split), deterministic split."""

import json

import pytest

from ochat.data.filter import filter_record, label_matches, parse_condition_map
from ochat.data.fit import Fitter
from ochat.data.split import choose_eval_groups
from ochat.data.tokenize import tokenize_records
from ochat.errors import OchatError
from ochat.models.tokenizers import prepare_tokenizer
from ochat.templates import ConversationEncoder, get_model_type


@pytest.mark.parametrize("label", ["GPT-4", "Model: GPT-4", "gpt-4", "gpt4", "Model: gpt4", " GPT 4 "])
def test_gpt4_label_forms(label):
    for wanted in ("GPT-4", "Model: GPT-4", "gpt4"):
        assert label_matches(label, wanted)
    assert not label_matches(label, "GPT-3.5")


def test_label_edge_cases():
    assert label_matches("Model: Default (GPT-3.5)", "GPT-3.5")
    assert label_matches("Model: Legacy (GPT-3.5)", "gpt-3.5")
    assert not label_matches("GPT-4o", "GPT-4")
    assert not label_matches(None, "GPT-4")
    assert label_matches(None, "any")


def test_condition_map_forms(tmp_path):
    expected = {"GPT-4": ("GPT4", 1.0), "GPT-3.5": ("GPT3", 0.1)}
    assert parse_condition_map("GPT-4=GPT4:1.0,GPT-3.5=GPT3:0.1") == expected
    assert parse_condition_map('{"GPT-4": {"condition": "GPT4", "weight": 1}, "GPT-3.5": ["GPT3", 0.1]}') == expected
    f = tmp_path / "map.json"
    f.write_text(json.dumps({"GPT-4": "GPT4", "*": ["GPT3", 0.1]}))
    assert parse_condition_map(str(f)) == {"GPT-4": ("GPT4", 1.0), "*": ("GPT3", 0.1)}
    assert parse_condition_map("GPT-4=GPT4 Correct") == {"GPT-4": ("GPT4 Correct", 1.0)}
    assert parse_condition_map(None) is None
    for bad in ("GPT-4=GPT4:heavy", "{oops", "no-such-file.json", "=X:1"):
        with pytest.raises(OchatError, match="--condition-map"):
            parse_condition_map(bad)


def test_filter_and_label():
    rec = {"id": "a", "model": "Model: Default (GPT-3.5)",
           "items": [{"role": "user", "content": "q", "weight": None}, {"role": "assistant", "content": "a", "weight": None}]}
    assert filter_record(rec, ["GPT-4"], None)[:2] == (None, "model_not_selected")
    assert filter_record({**rec, "model": None}, ["GPT-4"], None)[:2] == (None, "no_model_label")
    kept, _, _ = filter_record(rec, ["GPT-4"], parse_condition_map("GPT-4=GPT4:1,GPT-3.5=GPT3:0.1"))
    assert kept["condition"] == "GPT3" and [m["weight"] for m in kept["items"]] == [0.0, 0.1]
    assert filter_record(rec, ["GPT-4"], parse_condition_map("GPT-4=GPT4"))[1] == "model_not_in_condition_map"


def test_split_is_deterministic():
    groups = [f"c{i}" for i in range(1000)]
    a = choose_eval_groups(groups, 0.01, 42)
    assert len(a) == 10 and a == choose_eval_groups(list(reversed(groups)), 0.01, 42)
    assert a != choose_eval_groups(groups, 0.01, 7)
    assert len(choose_eval_groups(groups[:20], 0.01, 42)) == 1 and not choose_eval_groups(groups, 0.0, 42)
    with pytest.raises(OchatError):
        choose_eval_groups(groups, 1.5, 42)


@pytest.fixture()
def enc35(mistral_tokenizer):
    prepare_tokenizer(mistral_tokenizer, get_model_type("openchat_3.5"))
    return ConversationEncoder("openchat_3.5", mistral_tokenizer)


def _record(n_exchanges, words=40):
    items = []
    for i in range(n_exchanges):
        items.append({"role": "user", "content": f"Question {i}: " + "tell me more " * 5, "weight": None})
        items.append({"role": "assistant", "content": f"Answer {i}: " + "the quick brown fox jumps " * words,
                      "weight": None})
    return {"id": "long", "group": "long", "model": "GPT-4", "source": "test", "system": "", "condition": "GPT4",
            "items": items}


def test_fit_truncate(enc35):
    rec = _record(6)
    full = len(enc35.encode_one(tokenize_ready(rec))[0])
    fitter = Fitter(enc35, "truncate", max_context=full // 2)
    res = fitter.fit(rec)
    (piece,) = res.pieces
    assert piece["truncated"] and res.truncated == 1 and piece["items"][-1]["role"] == "assistant"
    assert len(piece["items"]) < len(rec["items"])
    rows, cut = tokenize_records(enc35, [piece], fitter.max_context)
    assert fitter.max_context - 5 <= len(rows[0].tokens) <= fitter.max_context and cut == 0
    assert rows[0].tokens[-1] != enc35.eot_id  # a cut answer does not end its turn
    # a conversation that fits is untouched and tokenized exactly like the encoder does
    small = _record(1, words=2)
    assert Fitter(enc35, "truncate").fit(small).pieces == [small]
    rows, _ = tokenize_records(enc35, [small])
    assert (rows[0].tokens, rows[0].weights) == enc35.encode_one(tokenize_ready(small))
    # too long from the first exchange on: dropped, counted
    res = Fitter(enc35, "truncate", max_context=20).fit(rec)
    assert not res.pieces and res.dropped[0][0] == "too_long"


def test_fit_split(enc35):
    rec = _record(6)
    one = len(enc35.encode_one(tokenize_ready(_record(1)))[0])
    fitter = Fitter(enc35, "split", max_context=int(one * 2.5))
    res = fitter.fit(rec)
    assert [p["id"] for p in res.pieces] == ["long_0", "long_1", "long_2"]
    assert {p["group"] for p in res.pieces} == {"long"}
    assert sum(len(p["items"]) for p in res.pieces) == len(rec["items"]) and not res.truncated
    rows, cut = tokenize_records(enc35, res.pieces, fitter.max_context)
    assert cut == 0 and all(len(r.tokens) <= fitter.max_context for r in rows)
    assert all(r.tokens[-1] == enc35.eot_id for r in rows)


def tokenize_ready(rec):
    from ochat.data.fit import to_conversation

    return to_conversation(rec)
