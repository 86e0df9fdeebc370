# Helpers for the rules: paths, shard lists, settings passed to the report. No rule lives here.

import json
import os
import re
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
    name=r"[A-Za-z0-9_.-]+",  # as the schema's `name`: no slash, so results/{name}/… paths never overlap
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
    write_experiment_table,


def check_config():
    """Checks JSON Schema cannot express; each names the config key."""
    for k in KS:
        if k & (k - 1):
            raise ValueError(f"cache.k: {k} is not a power of two")
    if config["model"]["path"] == "demo" and config["model"]["adapter"]:
        raise ValueError("model.adapter: the embedded demo model takes no adapter")


check_config()


def model_dir():
    """The model directory: the user's, the embedded demo model (train_demo_model) or SmolLM2 (convert_smollm2)."""
    built = {"demo": f"{RESULTS}/demo_model", "smollm2": f"{RESULTS}/smollm2_model"}
    return built.get(config["model"]["path"], config["model"]["path"])


def adapter_dir():
    """The adapter directory: none, the user's, or the one finetune_lora trains on data.train ("finetune")."""
    adapter = config["model"]["adapter"]
    return f"{RESULTS}/lora_adapter" if adapter == "finetune" else adapter


def model_inputs(wildcards):
    """Model (and adapter) directories as rule inputs, so that a rebuilt model reruns what depends on it."""
    inputs = {"model": model_dir()}
    if adapter_dir():
        inputs["adapter"] = adapter_dir()
    return inputs


def model_flags():
    """CLI flags selecting the model and its adapter."""
    flags = f"--model {model_dir()}"
    if adapter_dir():
        flags += f" --adapter {adapter_dir()}"
    return flags


def grads_flags(cache=config["cache"]):
    """CLI flags of every setting the cached vectors depend on (shared by training and query gradients)."""
    ks = cache["k"] if isinstance(cache["k"], list) else [cache["k"]]
    flags = (
        f"{model_flags()} --compressor {cache['compressor']} --k {' '.join(map(str, ks))} --seed {cache['seed']}"
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
    if EXPERIMENT["study"]:
        outputs += [f"{RESULTS}/tables/{config['name']}.{ext}" for ext in ("md", "csv")]
        outputs.append(f"{RESULTS}/plots/{config['name']}.png")
    return outputs


# Experiments (config/experiments/): every method gives results/<name>/methods/<method>/scores.zarr. Gradient
# methods score a cache variant: "main" is the pipeline's own cache (config `cache`), the others override some of
# its settings and are built by the same rules under results/<name>/methods/cache/<variant>/.
EXPERIMENT = config["experiment"]
RAPIDIN_METHOD = re.compile(r"rapidin_k(\d+)(?:_seed(\d+))?")
CACHE_VARIANTS = {
    "exact": {"compressor": "none"},
    "exact_raw": {"compressor": "none", "normalize": False, "dtype": "float32"},  # raw gradients underflow fp16
    "factored": {"compressor": "factored"},
}


def check_experiment():
    """Checks of the experiment section JSON Schema cannot express; each names the config key."""
    if EXPERIMENT["methods"] and not EXPERIMENT["study"]:
        raise ValueError("experiment.study: methods are given but no study (backdoor, error_tracing, compression)")
    if EXPERIMENT["study"] and not EXPERIMENT["methods"]:
        raise ValueError(f"experiment.methods: study {EXPERIMENT['study']} needs at least one method")
    if EXPERIMENT["study"] == "compression" and EXPERIMENT["reference"] not in EXPERIMENT["methods"]:
        raise ValueError(f"experiment.reference: {EXPERIMENT['reference']} is not among experiment.methods")
    for method in EXPERIMENT["methods"]:
        match = RAPIDIN_METHOD.fullmatch(method)
        if match and (int(match[1]) not in KS or config["cache"]["compressor"] != "rapidgrad"):
            raise ValueError(f"experiment.methods: {method} needs cache.compressor rapidgrad with {match[1]} in cache.k")
        if match and not config["cache"]["normalize"]:
            raise ValueError(f"experiment.methods: {method} needs cache.normalize true")


check_experiment()


def method_source(method):
    """(cache variant, array) a gradient method scores; lissa scores its own queries against variant exact_raw."""
    fixed = {
        "tracin": ("exact_raw", "exact"),
        "lissa": ("exact_raw", "exact"),
        "tracin_ln": ("exact", "exact"),
        "factored": ("factored", "factored"),
    }
    if method in fixed:
        return fixed[method]
    k, seed = RAPIDIN_METHOD.fullmatch(method).groups()
    seed = config["cache"]["seed"] if seed is None else int(seed)
    return ("main" if seed == config["cache"]["seed"] else f"seed{seed}"), f"k{k}"


def variant_cache(variant):
    """The cache settings of a variant: config `cache` with the variant's overrides (seed<S>: another seed)."""
    if variant.startswith("seed"):
        return {**config["cache"], "seed": int(variant.removeprefix("seed"))}
    return {**config["cache"], **CACHE_VARIANTS[variant]}


def variant_grads_flags(wildcards):
    return grads_flags(variant_cache(wildcards.variant))


def variant_dir(variant):
    return f"{RESULTS}/cache" if variant == "main" else f"{RESULTS}/methods/cache/{variant}"


def method_queries(method):
    """The query store a gradient method scores: its cache variant's, or LiSSA's inverse-Hessian products."""
    return f"{RESULTS}/methods/lissa/queries.zarr" if method == "lissa" else f"{variant_dir(method_source(method)[0])}/queries.zarr"


def method_score_inputs(wildcards):
    """The query store and the training-cache shard a gradient method scores."""
    variant = method_source(wildcards.grad_method)[0]
    return {
        "queries": method_queries(wildcards.grad_method),
        "cache": f"{variant_dir(variant)}/train/{wildcards.shard}.zarr",
    }


def method_array_flag(wildcards):
    return f"--array {method_source(wildcards.grad_method)[1]}"


def method_merge_inputs(wildcards):
    return {
        "shards": [f"{RESULTS}/methods/{wildcards.grad_method}/scores/{shard}.zarr" for shard in SHARDS],
        "queries": method_queries(wildcards.grad_method),
    }


def method_costs(method):
    """What the experiment table needs about a method (rapidin.experiments): scores, cache, benchmark files."""
    bench = f"{RESULTS}/benchmarks"
    cost = {"scores": f"{RESULTS}/methods/{method}/scores.zarr", "cache": None, "array": None, "benchmarks": {}}
    if method in ("random", "bm25"):
        cost["benchmarks"]["other"] = [f"{bench}/score_baseline/{method}.tsv"]
        return cost
    variant, array = method_source(method)
    cost["cache"], cost["array"] = f"{variant_dir(variant)}/train/{SHARDS[0]}.zarr", array
    train, queries = (
        ("cache_train_grads", "cache_query_grads")
        if variant == "main"
        else (f"cache_variant_train_grads/{variant}", f"cache_variant_query_grads/{variant}")
    )
    cost["benchmarks"] = {
        "train_cache": [f"{bench}/{train}/{shard}.tsv" for shard in SHARDS],
        "query_cache": [f"{bench}/{queries}.tsv"],
        "score": [f"{bench}/score_method_shard/{method}/{shard}.tsv" for shard in SHARDS],
        "other": [f"{bench}/lissa_queries.tsv"] if method == "lissa" else [],
    }
    return cost


def table_inputs(wildcards):
    """Every method's scores store (and, unless for the compression study, its metrics)."""
    methods = EXPERIMENT["methods"]
    inputs = {"scores": [f"{RESULTS}/methods/{m}/scores.zarr" for m in methods]}
    if EXPERIMENT["study"] != "compression":
        inputs["metrics"] = [f"{RESULTS}/methods/{m}/metrics.json" for m in methods]
    return inputs


def table_flags(wildcards, input):
    """The table's study-specific flags."""
    if EXPERIMENT["study"] != "compression":
        return f"--metrics {' '.join(input.metrics)}"
    return f"--reference {EXPERIMENT['reference']}"


def experiment_costs():
    return json.dumps({m: method_costs(m) for m in EXPERIMENT["methods"]})
