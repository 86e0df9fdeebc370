"""Config overrides from the command line, typed by the JSON schema before validation.

`snakemake --config cache='{k: 4096}'` hands nested values over as strings; each string whose key the
schema types as non-string is parsed as YAML (so "4096" becomes 4096 and "null" None), and scalars where
the schema wants a string become strings. Everything else is left for validation to judge: `check_schema`
reports the first offending key in one line.
"""

from __future__ import annotations

import yaml
from jsonschema.exceptions import best_match
from jsonschema.validators import validator_for


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


def _load(schema_path: str) -> dict:
    with open(schema_path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def coerce_config(config: dict, schema_path: str) -> None:
    """Coerce a Snakemake config in place against the schema file."""
    config.update(coerce(dict(config), _load(schema_path)))


def check_schema(config: dict, schema_path: str) -> None:
    """Raise ValueError naming the first offending key in one line (Snakemake's own report dumps the schema)."""
    schema = _load(schema_path)
    error = best_match(validator_for(schema)(schema).iter_errors(config))
    if error is not None:
        raise ValueError(f"{'.'.join(map(str, error.absolute_path)) or 'config'}: {error.message}")
