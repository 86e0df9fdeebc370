# Helpers for the rules: paths, shard lists, settings passed to the report. No rule lives here.

import json
import sys

RAPIDIN = f"{sys.executable} -m rapidin"
RESULTS = f"results/{config['name']}"
LOGS = f"{RESULTS}/logs"
SHARDS = [f"{i:05d}" for i in range(config["cache"]["n_shards"])]
KS = config["cache"]["k"] if isinstance(config["cache"]["k"], list) else [config["cache"]["k"]]


wildcard_constraints:
    shard=r"\d{5}",
    split="train|queries",


def check_config():
    """Checks JSON Schema cannot express; each names the config key."""
    for k in KS:
        if k & (k - 1):
            raise ValueError(f"cache.k: {k} is not a power of two")
    if config["model"]["path"] == "demo" and config["model"]["adapter"]:
        raise ValueError("model.adapter: the embedded demo model takes no adapter")


check_config()


def model_dir():
    """The model directory: the user's, or the embedded demo model built by train_demo_model."""
    return f"{RESULTS}/demo_model" if config["model"]["path"] == "demo" else config["model"]["path"]


def model_inputs(wildcards):
    """Model (and adapter) directories as rule inputs, so that a rebuilt model reruns what depends on it."""
    inputs = {"model": model_dir()}
    if config["model"]["adapter"]:
        inputs["adapter"] = config["model"]["adapter"]
    return inputs


def model_flags():
    """CLI flags selecting the model, its adapter and the gradient space."""
    flags = f"--model {model_dir()}"
    if config["model"]["adapter"]:
        flags += f" --adapter {config['model']['adapter']}"
    if config["model"]["modules"]:
        flags += f" --modules '{config['model']['modules']}'"
    return flags


def grads_flags():
    """CLI flags of every setting the cached vectors depend on (shared by training and query gradients)."""
    cache = config["cache"]
    flags = (
        f"{model_flags()} --compressor {cache['compressor']} --k {' '.join(map(str, KS))} --seed {cache['seed']}"
        f" --dtype {cache['dtype']} --batch-tokens {cache['batch_tokens']} --model-dtype {config['model']['dtype']}"
    )
    return flags if cache["normalize"] else f"{flags} --no-normalize"


def data_path(wildcards):
    return config["data"][wildcards.split]


def run_settings():
    """The settings shown in the report."""
    return json.dumps(
        {
            "name": config["name"],
            "model": config["model"]["path"],
            "adapter": config["model"]["adapter"],
            "modules": config["model"]["modules"],
            "compressor": config["cache"]["compressor"],
            "K": KS,
            "n_shards": config["cache"]["n_shards"],
            "dtype": config["cache"]["dtype"],
            "seed": config["cache"]["seed"],
            "layer-wise normalisation": config["cache"]["normalize"],
            "train": config["data"]["train"],
            "queries": config["data"]["queries"],
        }
    )


def final_outputs():
    return [
        f"{RESULTS}/influence/scores.zarr",
        f"{RESULTS}/influence/topk.jsonl",
        f"{RESULTS}/metrics.json",
        f"{RESULTS}/report/index.html",
    ]
