# Helpers for the rules: paths, shard lists, settings passed to the report. No rule lives here.

import json
import os
import sys
from pathlib import Path

# Rules call the `rapidin` console script of the Python that runs Snakemake (.venv/bin), activated or not.
# Rules name no conda env or container (snakemake --lint asks for them): requirements.txt pins the environment.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
RESULTS = f"results/{config['name']}"
LOGS = f"{RESULTS}/logs"
SHARDS = [f"{i:05d}" for i in range(config["cache"]["n_shards"])]
KS = config["cache"]["k"] if isinstance(config["cache"]["k"], list) else [config["cache"]["k"]]


wildcard_constraints:
    shard=r"\d{5}",
    split="train|queries",
    token="|token_",  # "" for one row per query, "token_" for one row per query response token


# Small steps run where snakemake runs, never as cluster jobs.
localrules:
    make_demo_data,
    tokenize_dataset,
    merge_scores,
    write_topk,
    attribute_tokens,
    write_report,


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
    """CLI flags selecting the model and its adapter."""
    flags = f"--model {model_dir()}"
    if config["model"]["adapter"]:
        flags += f" --adapter {config['model']['adapter']}"
    return flags


def grads_flags():
    """CLI flags of every setting the cached vectors depend on (shared by training and query gradients)."""
    cache = config["cache"]
    flags = (
        f"{model_flags()} --compressor {cache['compressor']} --k {' '.join(map(str, KS))} --seed {cache['seed']}"
        f" --rank {cache['rank']}"
        f" --dtype {cache['dtype']} --batch-tokens {cache['batch_tokens']} --model-dtype {config['model']['dtype']}"
    )
    if cache["chunk_rows"]:
        flags += f" --chunk-rows {cache['chunk_rows']}"
    if config["model"]["modules"]:
        flags += f" --modules '{config['model']['modules']}'"
    return flags if cache["normalize"] else f"{flags} --no-normalize"


def data_path(wildcards):
    """The training set, or the queries with their missing responses generated (rule complete_queries)."""
    return config["data"]["train"] if wildcards.split == "train" else f"results/{wildcards.name}/queries.jsonl"


def report_inputs(wildcards):
    """What the report shows: token shading too when token-wise influence is on."""
    inputs = {
        "topk": f"results/{wildcards.name}/influence/topk.jsonl",
        "scores": f"results/{wildcards.name}/influence/scores.zarr",
        "metrics": f"results/{wildcards.name}/metrics.json",
        "train": config["data"]["train"],
    }
    if config["tokenwise"]["enabled"]:
        inputs["tokens"] = f"results/{wildcards.name}/influence/tokens.jsonl"
    return inputs


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
            "generation (queries without a response)": generation_settings(),
            "token-wise samples per query and side": (
                config["tokenwise"]["top_samples"] if config["tokenwise"]["enabled"] else None
            ),
        }
    )


def generate_flags():
    """CLI flags of how responses missing from the queries are generated."""
    generate = config["generate"]
    flags = f"--max-new-tokens {generate['max_new_tokens']} --temperature {generate['temperature']}"
    flags += f" --seed {generate['seed']} --template {config['data']['template']}"
    return f"{flags} --do-sample" if generate["do_sample"] else flags


def tokens_flag(wildcards, input):
    """The report's --tokens flag, when token-wise influence is among its inputs."""
    return f"--tokens {input.tokens}" if "tokens" in input.keys() else ""


def generation_settings():
    """How responses missing from the queries are generated, in words."""
    generate = config["generate"]
    decoding = f"sampling at temperature {generate['temperature']}" if generate["do_sample"] else "greedy"
    return f"{decoding}, at most {generate['max_new_tokens']} new tokens, seed {generate['seed']}"


def final_outputs():
    outputs = [
        f"{RESULTS}/queries.jsonl",
        f"{RESULTS}/influence/scores.zarr",
        f"{RESULTS}/influence/topk.jsonl",
        f"{RESULTS}/metrics.json",
        f"{RESULTS}/report/index.html",
    ]
    if config["tokenwise"]["enabled"]:
        outputs += [f"{RESULTS}/influence/token_scores.zarr", f"{RESULTS}/influence/tokens.jsonl"]
    return outputs
