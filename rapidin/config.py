"""The workflow's config: typed, completed with the schema's defaults and checked, in one call (`validate_config`).

`snakemake --config cache='{k: 4096}'` hands nested values over as strings; each string whose key the
schema types as non-string is parsed as YAML (so "4096" becomes 4096 and "null" None), and scalars where
the schema wants a string become strings. The schema (rapidin/config.schema.yaml, shipped with the package so
the workflow runs from any directory and as a Snakemake module) then judges, and the first offending key is
reported in one line; so are the checks JSON Schema cannot express.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import re
from importlib.resources import files
from pathlib import Path

import yaml
from jsonschema.exceptions import best_match
from jsonschema.validators import validator_for

from rapidin.errors import RapidinError
from rapidin.methods import parse_method

SCHEMA = files("rapidin") / "config.schema.yaml"
BUILT_MODELS = ("demo", "smollm2")  # model.path values the workflow builds itself
PRECONDITION_MAX_DIM = 1 << 13  # rapidin.score.precondition.MAX_DIM (not imported: it loads torch)


def _types(schema: dict) -> set[str]:
    """JSON types a (sub)schema admits, looking through oneOf/anyOf."""
    kinds = schema.get("type", [])
    kinds = {kinds} if isinstance(kinds, str) else set(kinds)
    for alternative in schema.get("oneOf", []) + schema.get("anyOf", []):
        kinds |= _types(alternative)
    if "enum" in schema and not kinds:
        kinds = {type(v).__name__ for v in schema["enum"]}
    return kinds


def _items_schema(schema: dict) -> dict:
    for candidate in [schema, *schema.get("oneOf", []), *schema.get("anyOf", [])]:
        if "items" in candidate:
            return candidate["items"]
    return {}


def coerce(value, schema: dict):
    """The value with command-line strings converted to the types `schema` expects."""
    kinds = _types(schema)
    if isinstance(value, str) and kinds and "string" not in kinds:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    elif isinstance(value, str) and value == "null" and "null" in kinds:
        return None
    elif isinstance(value, bool | int | float) and kinds == {"string"}:
        return str(value)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        return {key: coerce(item, properties.get(key, {})) for key, item in value.items()}
    if isinstance(value, list):
        return [coerce(item, _items_schema(schema)) for item in value]
    return value


@functools.cache
def load_schema() -> dict:
    """The config schema (read once; not to be modified)."""
    return yaml.safe_load(SCHEMA.read_text(encoding="utf-8"))


def with_defaults(value, schema: dict):
    """The value with every missing key that has a schema default filled in, recursively."""
    if not isinstance(value, dict):
        return value
    properties = schema.get("properties", {})
    filled = {key: with_defaults(item, properties.get(key, {})) for key, item in value.items()}
    for key, sub in properties.items():
        if key not in filled and "default" in sub:
            filled[key] = with_defaults(copy.deepcopy(sub["default"]), sub)
    return filled


@functools.cache
def _validator():
    schema = load_schema()
    return validator_for(schema)(schema)


def check_schema(config: dict) -> None:
    """Raise RapidinError naming the first offending key in one line (Snakemake's own report dumps the schema)."""
    error = best_match(_validator().iter_errors(config))
    if error is not None:
        raise RapidinError(f"{key_name(error.absolute_path)}: {error.message}")


def key_name(path) -> str:
    """A config key from its path: model.checkpoints[0].path (list positions in brackets); `config` for the root."""
    name = ""
    for part in path:
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else str(part)
    return name or "config"


def validate_config(config: dict) -> None:
    """Type, complete and check a Snakemake config in place; the first problem raises one line naming its key."""
    schema = load_schema()
    checked = with_defaults(coerce(dict(config), schema), schema)
    check_schema(checked)
    _check_values(checked)
    _check_inputs(checked)
    config.clear()
    config.update(checked)


def _check_values(config: dict) -> None:
    """Checks JSON Schema cannot express."""
    cache, model, experiment = config["cache"], config["model"], config["experiment"]
    ks = cache["k"] if isinstance(cache["k"], list) else [cache["k"]]
    for k in ks:
        if k & (k - 1):
            raise RapidinError(f"cache.k: {k} is not a power of two")
    if model["path"] == "demo" and model["adapter"]:
        raise RapidinError("model.adapter: the embedded demo model takes no adapter")
    if cache["optimizer"] != "none" and cache["compressor"] == "factored":
        raise RapidinError(
            f"cache.optimizer: {cache['optimizer']} needs the gradients themselves, which compressor factored never "
            "builds; use cache.compressor rapidgrad or none"
        )
    _check_checkpoints(config)
    if experiment["methods"] and not cache["store"]:
        raise RapidinError("cache.store: the experiments score stored caches; set it true")
    if experiment["methods"] and not experiment["study"]:
        raise RapidinError("experiment.study: methods are given but no study (backdoor, error_tracing, compression)")
    if experiment["study"] and not experiment["methods"]:
        raise RapidinError(f"experiment.methods: study {experiment['study']} needs at least one method")
    if experiment["study"] == "compression" and experiment["reference"] not in experiment["methods"]:
        raise RapidinError(f"experiment.reference: {experiment['reference']} is not among experiment.methods")
    for method in experiment["methods"]:
        parsed = parse_method(method)
        if parsed.k is not None and (parsed.k not in ks or cache["compressor"] != "rapidgrad"):
            raise RapidinError(
                f"experiment.methods: {method} needs cache.compressor rapidgrad with {parsed.k} in cache.k"
            )
        if parsed.k is not None and not cache["normalize"]:
            raise RapidinError(f"experiment.methods: {method} needs cache.normalize true")
        if parsed.precondition and parsed.k > PRECONDITION_MAX_DIM:
            raise RapidinError(
                f"experiment.methods: {method}: preconditioning needs K ≤ {PRECONDITION_MAX_DIM} (add it to cache.k)"
            )
        if parsed.checkpoints and not model["checkpoints"]:
            raise RapidinError(f"experiment.methods: {method} sums over model.checkpoints, but there are none")
        if parsed.adam and cache["compressor"] == "factored" and parsed.k is not None:
            raise RapidinError(f"experiment.methods: {method} needs cache.compressor rapidgrad")


def checkpoint_name(path: str) -> str:
    """The workflow's name of a model.checkpoints directory (wildcard `ckpt`, results/<name>/checkpoints/<ckpt>/):
    its last path component, made safe, and 8 hex digits of a hash of the path as written — stable when other
    checkpoints are added or removed."""
    normal = os.path.normpath(path)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(normal)).lstrip(".") or "checkpoint"
    return f"{stem}-{hashlib.sha256(normal.encode()).hexdigest()[:8]}"


CHECKPOINT_NAME_PATTERN = r"[A-Za-z0-9_-][A-Za-z0-9_.-]*-[0-9a-f]{8}"  # checkpoint_name's


def _check_checkpoints(config: dict) -> None:
    """model.checkpoints: distinct directories, scored from stored caches."""
    seen = {}
    for i, entry in enumerate(config["model"]["checkpoints"]):
        path = os.path.normpath(entry["path"])
        if path in seen:
            raise RapidinError(f"model.checkpoints[{i}]: {entry['path']} is model.checkpoints[{seen[path]}] again")
        seen[path] = i
    if config["model"]["checkpoints"] and not config["cache"]["store"]:
        raise RapidinError("model.checkpoints: checkpoints are scored from stored caches; set cache.store true")
    lrs = [entry.get("lr") for entry in config["model"]["checkpoints"]]
    if lrs and all(lr is not None for lr in lrs) and sum(lrs) == 0:
        raise RapidinError("model.checkpoints: every lr is 0")


def _check_inputs(config: dict) -> None:
    """Input files named by the config must exist, unless the workflow writes them (under results/<name>/)."""
    produced = Path("results", config["name"])
    inputs = {"data.train": config["data"]["train"], "data.queries": config["data"]["queries"]}
    if config["model"]["path"] not in BUILT_MODELS:
        inputs["model.path"] = config["model"]["path"]
    if config["model"]["adapter"] not in (None, "finetune"):
        inputs["model.adapter"] = config["model"]["adapter"]
    for key, path in inputs.items():
        if produced in Path(os.path.normpath(path)).parents:
            continue
        if not os.path.exists(path):
            raise RapidinError(f"{key}: no such file or directory: {path}")
    marker = "adapter_config.json" if config["model"]["adapter"] else "config.json"
    for i, entry in enumerate(config["model"]["checkpoints"]):
        path = entry["path"]
        if produced in Path(os.path.normpath(path)).parents:
            continue
        if not os.path.isdir(path):
            raise RapidinError(f"model.checkpoints[{i}]: no such directory: {path}")
        if not os.path.isfile(os.path.join(path, marker)):
            kind = "an adapter (model.adapter is set)" if config["model"]["adapter"] else "a model"
            raise RapidinError(f"model.checkpoints[{i}]: {path} is not {kind} directory (no {marker})")
    entries = config["model"]["checkpoints"]
    if entries and all(os.path.isdir(entry["path"]) for entry in entries):  # else: when the workflow has built them
        from rapidin.score.checkpoints import resolve_checkpoints  # (loads zarr and torch: only when needed)

        resolve_checkpoints(entries)  # their weights: given, logged in trainer_state.json, or equal
