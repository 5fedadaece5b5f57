import json

import pytest

from ochat.errors import OchatError
from ochat.models.model_dir import ModelDir


def _dir(tmp_path, ochat_json=None):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    if ochat_json is not None:
        (d / "ochat.json").write_text(ochat_json if isinstance(ochat_json, str) else json.dumps(ochat_json))
    return d


def test_model_type_from_flag_else_ochat_json(tmp_path):
    d = _dir(tmp_path, {"model_type": "openchat_v3.2"})
    assert ModelDir(d).model_type.name == "openchat_v3.2"
    assert ModelDir(d, model_type="auto").model_type.name == "openchat_v3.2"
    assert ModelDir(d, model_type="openchat_3.6").model_type.name == "openchat_3.6"
    assert ModelDir(d, model_type="openchat_v3.2_mistral").model_type.name == "openchat_3.5"   # upstream's name


def test_one_error_for_each_problem(tmp_path):
    with pytest.raises(OchatError, match=r"^--model .*nope: not a directory"):
        ModelDir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OchatError, match="no config.json"):
        ModelDir(tmp_path / "empty")
    d = _dir(tmp_path)
    with pytest.raises(OchatError, match="no ochat.json with a model_type; pass --model-type"):
        ModelDir(d, "--base").model_type
    assert ModelDir(d).model_type_name is None and ModelDir(d).model_type_or("openchat_3.5").name == "openchat_3.5"
    with pytest.raises(OchatError, match="unknown model type 'gpt9'"):
        ModelDir(d, model_type="gpt9")
    with pytest.raises(OchatError, match="no weights"):
        ModelDir(d, require_weights=True)
    (d / "ochat.json").write_text("{broken")
    with pytest.raises(OchatError, match="ochat.json: not valid JSON"):
        ModelDir(d).model_type
