"""`ochat serve`'s options and the seed-era `python -m ochat.serving.openai_api_server` both come from
ServeConfig, so they cannot drift."""

from __future__ import annotations

from ochat.compat.serving import SEED_ALIASES, build_parser, parse_args
from ochat.serving.served_model import ServeConfig
from cli_options import assert_options_are_the_fields, assert_shim_accepts_the_fields


def test_ochat_serve_options_are_exactly_the_serveconfig_fields():
    from ochat.serving.cli import serve

    assert_options_are_the_fields(serve, ServeConfig)


def test_seed_shim_accepts_every_field_and_only_those():
    assert_shim_accepts_the_fields(build_parser(), ServeConfig, SEED_ALIASES)


def test_seed_spellings_parse_to_serveconfig():
    config, unknown = parse_args(["--model_type", "openchat_3.5", "--model_path", "/m", "--port", "9000",
                                  "--api_keys", "a,b", "c", "--allowed_origins", "http://x", "--max_n", "4",
                                  "--disable_log_requests", "--no-engine-process", "--future_flag"])
    assert config == ServeConfig(model="/m", model_type="openchat_3.5", port=9000, api_keys=["a", "b", "c"],
                                 cors_origins=["http://x"], max_n=4, disable_log_requests=True, engine_process=False)
    assert unknown == ["--future_flag"]
    assert parse_args(["--model", "/m"])[0] == ServeConfig(model="/m")


def test_readme_lists_every_unsupported_field():
    from pathlib import Path

    from ochat.serving.validation import CHAT_UNSUPPORTED, UNSUPPORTED

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("**Not supported**"):][:2000]
    for name in [*UNSUPPORTED, *CHAT_UNSUPPORTED]:
        assert f"`{name}" in section or (name.startswith("guided_") and "`guided_*`" in section), name
