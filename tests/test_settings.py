"""One source of truth: every settings field is a config key with the same default in the schema and in
config/config.yaml, every step's flags are its settings fields, and `cache.k` keeps one name from the config to
the stored attributes."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml
import zarr

from rapidin import settings as settings_module
from rapidin.cli import build_parser
from rapidin.config import load_schema, with_defaults
from rapidin.settings import CacheSettings
from rapidin.steps import STEPS

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [getattr(settings_module, name) for name in settings_module.__all__ if name[0].isupper()]


def schema_at(schema: dict, key: str) -> dict:
    for part in key.split("."):
        schema = schema["properties"][part]
    return schema


def config_at(config: dict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def as_config(value):
    """A settings default as the config writes it (tuples are YAML lists)."""
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda cls: cls.__name__)
def test_every_field_is_a_config_key_with_the_same_default(cls):
    schema = load_schema()
    documented = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    for field in dataclasses.fields(cls):
        key = field.metadata["key"]
        assert key.rsplit(".", 1)[-1] == field.name or (field.name, key) == ("model_dtype", "model.dtype"), key
        assert field.metadata["help"], key
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        schema_default = schema_at(schema, key)["default"]
        if key == "cache.k":  # the config also takes one K for a list of one
            assert as_config(default) == [schema_default]
        else:
            assert as_config(default) == schema_default, key
        assert config_at(documented, key) == schema_default, f"config/config.yaml {key}"


def test_the_documented_config_is_the_schema_default():
    assert yaml.safe_load((ROOT / "config/config.yaml").read_text()) == with_defaults({}, load_schema())


def step_parser(step: str) -> argparse.ArgumentParser:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[step]


@pytest.mark.parametrize("func", STEPS, ids=lambda func: func.__name__)
def test_each_step_has_one_flag_per_parameter_and_settings_field_with_help(func):
    flags = {a.dest: a for a in step_parser(func.__name__.replace("_", "-"))._actions if a.dest != "help"}
    hints = typing.get_type_hints(func)
    expected = set()
    for name in typing.get_type_hints(func):
        if name == "return":
            continue
        if dataclasses.is_dataclass(hints[name]):
            expected |= {f.name for f in dataclasses.fields(hints[name])}
        else:
            expected.add(name)
    assert set(flags) == expected
    assert all(action.help for action in flags.values()), [d for d, a in flags.items() if not a.help]


def test_cache_k_keeps_one_name_from_config_to_the_stored_attributes(tiny_run):
    """cache.k → schema → rule param k → flag --k → CacheSettings.k → attrs["rapidin"]["k"]."""
    assert "k" in schema_at(load_schema(), "cache")["properties"]
    rules = (ROOT / "workflow/rules/common.smk").read_text()  # CACHE_PARAMS and CACHE_FLAGS of every gradient rule
    assert re.search(r'^\s+k=cache_value\("k"\),$', rules, re.M) and "--k {params.k:q}" in rules
    assert "**CACHE_PARAMS" in (ROOT / "workflow/rules/cache.smk").read_text()
    args = step_parser("grads").parse_args(["--tokens", "t", "--model", "m", "--out", "o", "--k", "1024", "4096"])
    assert args.k == (1024, 4096) and CacheSettings(k=args.k).k == (1024, 4096)
    tiny_k = yaml.safe_load((ROOT / "config/tiny.yaml").read_text())["cache"]["k"]
    for store in ("cache/queries.zarr", "cache/train/00000.zarr", "influence/scores.zarr"):
        assert zarr.open_group(tiny_run / store, mode="r").attrs["rapidin"]["k"] == tiny_k


def test_version_flag(capsys):
    from rapidin import __version__
    from rapidin.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"rapidin {__version__}"
