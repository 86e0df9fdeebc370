"""Fuzzing the config check: whatever a user writes in a config file or on `--config`, `validate_config` either
accepts it (typed, complete) or refuses it with one line naming the key — never another exception."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rapidin.config import load_schema, validate_config
from rapidin.errors import RapidinError

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = load_schema()
SECTIONS = {name: sorted(sub.get("properties", {})) for name, sub in SCHEMA["properties"].items()}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=string.printable + "éü∇'\"$`;|&", max_size=30),
    st.sampled_from(["null", "4096", "[1024, 4096]", "{k: 1}", "true", "..", "-1", "1e400", "nan", "[", "{"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def configs(draw) -> dict:
    """Config dicts made mostly of real sections and keys, with values of any type (as YAML or --config gives)."""
    config = {}
    for section in draw(st.lists(st.sampled_from([*sorted(SECTIONS), "bogus"]), max_size=4, unique=True)):
        keys = SECTIONS.get(section, [])
        if not keys or draw(st.booleans()):
            config[section] = draw(values)
            continue
        chosen = draw(st.lists(st.sampled_from([*keys, "bogus"]), min_size=1, max_size=3, unique=True))
        config[section] = {key: draw(values) for key in chosen}
    return config


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_any_config_is_accepted_or_refused_in_one_line(config):
    try:
        validate_config(config)
    except RapidinError as error:
        message = str(error)
        assert message and "\n" not in message
        assert message.split(":")[0].split(".")[0] in {*SECTIONS, "config"}, message  # it names the key
    else:
        assert set(config) == set(SECTIONS)  # complete: every section, with its defaults


def test_the_default_config_is_accepted():
    config = {}
    validate_config(config)
    assert config["cache"]["k"] == 65536 and config["name"] == "demo"


def merged(base: dict, update: dict) -> dict:
    """`update` on top of `base`, section by section, as Snakemake merges --configfile files."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.mark.parametrize(
    "path", [*sorted((ROOT / "config/experiments").glob("*.yaml")), ROOT / "config/quality.yaml"], ids=lambda p: p.name
)
def test_every_shipped_config_file_passes_the_check_on_top_of_the_default(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    base = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    config = merged(base, yaml.safe_load(path.read_text()))
    if path.name in ("backdoor_lora.yaml", "compression.yaml"):  # they reuse experiment 1's data: run it first
        with pytest.raises(RapidinError, match=r"^data\.train: no such file or directory: results/backdoor/"):
            validate_config(config)
        return
    validate_config(config)
    assert config["cache"]["normalize"] is True
