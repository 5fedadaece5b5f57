"""Several models behind one server: `ochat serve --model DIR[:name=NAME] [--model DIR2[:name=NAME2] ...]`.

Each model has its own model type (from its ochat.json, or `:model_type=T`), tokenizer and engine (the
transformers engine runs in a process of its own per model), so one model's engine crashing or its queue
filling up touches only that model's requests: the others keep their own engine, queue and batch. The HTTP
layer (ochat.serving.api_server) routes each request by its `model` field; an unknown name is a 404 that
lists the served ones. A LoRA adapter directory written by `ochat train --lora-r` (no `--merge-lora`) is
a model of its own: its base (adapter_config.json's base_model_name_or_path) with the adapter applied.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ochat.errors import OchatError

SPEC_OPTIONS = ("name", "model_type", "engine")


@dataclass(frozen=True)
class ModelSpec:
    """One `--model` value: a directory and, optionally, the name clients use, its template and engine."""

    path: str
    name: str | None = None
    model_type: str | None = None
    engine: str | None = None


def parse_model_spec(text: str) -> ModelSpec:
    """`DIR`, or `DIR:name=NAME` (also `:model_type=T`, `:engine=E`, comma-separated). A directory whose
    name holds a colon is read whole unless what follows its last colon looks like `key=value`."""
    path, sep, options = text.rpartition(":")
    if not sep or "=" not in options:
        return ModelSpec(text)
    values: dict[str, str] = {}
    for item in options.split(","):
        key, eq, value = (s.strip() for s in item.partition("="))
        if key not in SPEC_OPTIONS:
            raise OchatError(f"--model {text}: unknown option '{key}' (expected DIR[:name=NAME], options: "
                             f"{', '.join(SPEC_OPTIONS)})")
        if not eq or not value:
            raise OchatError(f"--model {text}: option '{key}' needs a value ({key}=...)")
        values[key] = value
    if not path:
        raise OchatError(f"--model {text}: no model directory before ':'")
    return ModelSpec(path, **values)


def model_specs(models: list[str], served_model_name: str | None = None) -> list[ModelSpec]:
    """The specs of every `--model`, checked: at least one, and no two served under the same name."""
    if not models:
        raise OchatError("--model: give at least one model directory")
    specs = [parse_model_spec(m) for m in models]
    if served_model_name:
        if len(specs) > 1:
            raise OchatError("--served-model-name: with several models, name each one: --model DIR:name=NAME")
        specs[0] = dataclasses.replace(specs[0], name=specs[0].name or served_model_name)
    if len(specs) > 1:
        unnamed = [s.path for s in specs if not s.name]
        if unnamed:
            raise OchatError(f"--model {unnamed[0]}: with several models, name each one: --model {unnamed[0]}:name=NAME")
        names = [s.name for s in specs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise OchatError(f"--model: the name '{twice[0]}' is given to more than one model")
    return specs


def load_models(config) -> list:
    """One ServedModel per `--model`, loaded side by side (each engine process starts while the others
    load); if any fails, the ones already loaded are shut down and the first error is raised."""
    from ochat.serving.served_model import ServedModel

    specs = model_specs(list(config.model), config.served_model_name)
    if len(specs) == 1:
        return [ServedModel(config, specs[0])]
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = [pool.submit(ServedModel, config, s) for s in specs]
        results, errors = [], []
        for f in futures:
            try:
                results.append(f.result())
            except BaseException as e:     # noqa: BLE001 - re-raised below, after cleaning up
                errors.append(e)
    if errors:
        for s in results:
            s.engine.shutdown()
        raise errors[0]
    return results


def check_config(config) -> None:
    """What can be checked before loading anything (the Ray path loads models on other machines):
    the `--model` values, the model directories, the votes file's directory, the Ray flags."""
    for spec in model_specs(list(config.model), config.served_model_name):
        d = Path(spec.path).expanduser()
        if not d.is_dir():
            raise OchatError(f"--model {spec.path}: not a model directory")
    if config.votes_file:
        parent = Path(config.votes_file).expanduser().resolve().parent
        if not parent.is_dir():
            raise OchatError(f"--votes-file {config.votes_file}: directory {parent} does not exist")
    ray_flags = {"--ray-address": config.ray_address, "--replicas": config.replicas,
                 "--min-replicas": config.min_replicas, "--max-replicas": config.max_replicas,
                 "--target-ongoing-requests": config.target_ongoing_requests}
    given = [flag for flag, value in ray_flags.items() if value is not None]
    if given and not config.ray:
        raise OchatError(f"{given[0]}: only with --ray")
    if config.ray:
        from ochat.serving.ray_app import replica_options

        replica_options(config)             # raises on contradictory replica flags
