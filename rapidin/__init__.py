"""rapidin: token-wise influential training data retrieval for LLMs (RapidIn, Lin et al., ACL 2024).

In memory, for notebook-sized data: `rapidin.attribute(model_dir, train, queries, **settings)` (rapidin.api).
File by file, for large runs: the workflow's steps, `rapidin.steps.tokenize`, `.grads`, `.score`, `.merge`,
`.topk`, … with their settings dataclasses (rapidin.settings).
"""

__version__ = "0.2.0"

__all__ = ["Attribution", "CacheSettings", "DataSettings", "GenerateSettings", "ScoreSettings", "attribute", "steps"]


def __getattr__(name: str):
    """Import on first use, so that `import rapidin` (and the CLI's startup) stays light."""
    import importlib

    if name in ("attribute", "Attribution"):
        return getattr(importlib.import_module("rapidin.api"), name)
    if name in ("CacheSettings", "DataSettings", "GenerateSettings", "ScoreSettings"):
        return getattr(importlib.import_module("rapidin.settings"), name)
    if name == "steps":
        return importlib.import_module("rapidin.steps")
    raise AttributeError(f"module 'rapidin' has no attribute {name!r}")
