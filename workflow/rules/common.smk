# Helpers for the rules: paths, shard lists, the values each rule passes. No rule lives here.
# Rules pass config values as separate, quoted arguments ({params.x:q}, {input.x:q}): no value is ever
# interpreted by the shell, whatever it contains. A Zarr store is a rule's input or output by its zarr.json
# (written last, atomically): a directory() output would get a .snakemake_timestamp file, which zarr and xarray
# warn about on every open; the CLI takes a store by either path (rapidin.steps.Store).

import json
import os
import sys
from pathlib import Path

from rapidin.methods import CHECKPOINT_BASE as CHECKPOINT_METHOD_PATTERN
from rapidin.methods import PATTERN as METHOD_PATTERN
from rapidin.methods import parse_method
from rapidin.config import CHECKPOINT_NAME_PATTERN, checkpoint_name

# Rules call the `rapidin` console script of the Python that runs Snakemake (.venv/bin), activated or not.
# Rules name no conda env or container (snakemake --lint asks for them): requirements.txt pins the environment.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
RESULTS = f"results/{config['name']}"
SHARDS = [f"{i:05d}" for i in range(config["cache"]["n_shards"])]
KS = config["cache"]["k"] if isinstance(config["cache"]["k"], list) else [config["cache"]["k"]]
EXPERIMENT = config["experiment"]
FIELDS = json.dumps(config["data"]["fields"])  # the files' field names, for every step that reads them
# score.aggregate tokens: influence/scores.zarr aggregates the query response tokens' scores (rules/tokenwise.smk)
AGGREGATE_TOKENS = config["score"]["aggregate"] == "tokens"
SCORE_TOKENS = config["tokenwise"]["enabled"] or AGGREGATE_TOKENS  # the query response tokens are scored
# model.checkpoints by their wildcard names (rules/checkpoints.smk), in config order
CHECKPOINTS = {checkpoint_name(entry["path"]): entry for entry in config["model"]["checkpoints"]}


wildcard_constraints:
    name=r"[A-Za-z0-9_-][A-Za-z0-9_.-]*",  # as the schema's `name`: one path component, never . or ..
    shard=r"\d{5}",
    split="train|queries",
    token="|token_",  # "" for one row per query, "token_" for one row per query response token
    ckpt=CHECKPOINT_NAME_PATTERN,  # a model.checkpoints entry (rapidin.config.checkpoint_name)


# Small steps run where snakemake runs, never as cluster jobs.
localrules:
    make_demo_data,
    plan_run,
    tokenize_dataset,
    merge_scores,
    merge_checkpoint_scores,
    write_topk,
    attribute_tokens,
    write_report,
    write_experiment_table,


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


def adapter_input(wildcards, input):
    """The adapter directory for --adapter, or None (the CLI reads Snakemake's None as no adapter)."""
    return input.adapter if "adapter" in input.keys() else None


def checkpoint_inputs(wildcards):
    """A checkpoint's inputs: model (and adapter) as model_inputs, plus the checkpoint directory unless the workflow
    builds it inside one of those (the demo's checkpoint-<epoch>/ lie in its model directory)."""
    inputs = model_inputs(wildcards)
    path = CHECKPOINTS[wildcards.ckpt]["path"]
    if Path(RESULTS) not in Path(os.path.normpath(path)).parents:
        inputs["checkpoint"] = path
    return inputs


def checkpoint_model(wildcards, input):
    """--model of a checkpoint's caches: the checkpoint itself, or model.path when checkpoints are adapters."""
    return input.model if adapter_dir() else CHECKPOINTS[wildcards.ckpt]["path"]


def checkpoint_adapter(wildcards):
    """--adapter of a checkpoint's caches: with model.adapter set, checkpoints are adapter directories."""
    return CHECKPOINTS[wildcards.ckpt]["path"] if adapter_dir() else None


def data_path(wildcards):
    """The training set, or the queries with their missing responses generated (rule complete_queries)."""
    return config["data"]["train"] if wildcards.split == "train" else f"results/{wildcards.name}/queries.jsonl"


# Experiments (config/experiments/): every method gives results/<name>/methods/<method>/scores.zarr. Gradient
# methods score a cache variant: "main" is the pipeline's own cache (config `cache`), the others override some of
# its settings and are built by the same rules under results/<name>/methods/cache/<variant>/; "<variant>_adam"
# ("adam" for main) adds cache.optimizer adam. Methods summed over checkpoints (`_cp`) score the same variants at
# each checkpoint's weights, under results/<name>/checkpoints/<ckpt>/ (rules/checkpoints.smk).
CACHE_VARIANTS = {
    "main": {},
    "exact": {"compressor": "none"},
    "exact_raw": {"compressor": "none", "normalize": False, "dtype": "float32"},  # raw gradients underflow fp16
    "factored": {"compressor": "factored"},
}
VARIANT_PATTERN = r"exact|exact_raw|factored|seed\d+|adam|exact_adam|seed\d+_adam"


def variant_cache(variant):
    """The cache settings of a variant: config `cache` with the variant's overrides (seed<S>: another seed;
    _adam, or adam alone: optimizer-aware gradients)."""
    if variant == "adam" or variant.endswith("_adam"):
        return {**variant_cache(variant.removesuffix("adam").removesuffix("_") or "main"), "optimizer": "adam"}
    if variant.startswith("seed"):
        return {**config["cache"], "seed": int(variant.removeprefix("seed"))}
    return {**config["cache"], **CACHE_VARIANTS[variant]}


def cache_value(key):
    """Rule param: config `cache.<key>` of the rule's cache variant (wildcard `variant`; the main cache without)."""
    return lambda wildcards: variant_cache(wildcards.get("variant", "main"))[key]


# The settings the cached vectors depend on, as params named as their CacheSettings fields, and their flags.
CACHE_PARAMS = dict(
    compressor=cache_value("compressor"),
    k=cache_value("k"),
    rank=cache_value("rank"),
    seed=cache_value("seed"),
    dtype=cache_value("dtype"),
    normalize=cache_value("normalize"),
    batch_tokens=cache_value("batch_tokens"),
    chunk_rows=cache_value("chunk_rows"),
    on_nonfinite=cache_value("on_nonfinite"),
    optimizer=cache_value("optimizer"),
    modules=config["model"]["modules"],
    parameters=config["model"]["parameters"],
    model_dtype=config["model"]["dtype"],
)
CACHE_FLAGS = (
    "--compressor {params.compressor:q} --k {params.k:q} --rank {params.rank:q} --seed {params.seed:q}"
    " --dtype {params.dtype:q} --normalize {params.normalize:q} --batch-tokens {params.batch_tokens:q}"
    " --chunk-rows {params.chunk_rows:q} --on-nonfinite {params.on_nonfinite:q} --optimizer {params.optimizer:q}"
    " --modules {params.modules:q}"
    " --parameters {params.parameters:q} --model-dtype {params.model_dtype:q}"
)


def cache_command(step, *flags):
    """The command template of the gradient steps (`rapidin <step>`) with `flags`, then the cache's
    settings (CACHE_FLAGS); Snakemake fills in the placeholders, every value quoted."""
    return " ".join([f"rapidin --threads {{threads}} {step}", *flags, CACHE_FLAGS, "2>&1 | tee {log:q}"])


def method_source(method):
    """(cache variant, array) a gradient method scores; lissa scores its own queries against variant exact_raw."""
    fixed = {
        "tracin": ("exact_raw", "exact"),
        "lissa": ("exact_raw", "exact"),
        "tracin_ln": ("exact", "exact"),
        "factored": ("factored", "factored"),
    }
    parsed = parse_method(method)
    if parsed.base in fixed:
        variant, array = fixed[parsed.base]
    else:
        seed = config["cache"]["seed"] if parsed.seed is None else parsed.seed
        variant, array = ("main" if seed == config["cache"]["seed"] else f"seed{seed}"), f"k{parsed.k}"
    if parsed.adam:
        variant = "adam" if variant == "main" else f"{variant}_adam"
    return variant, array


def method_root(wildcards):
    """Where a method's caches and scores lie: results/<name>, or a checkpoint's folder (wildcard ckpt)."""
    return f"{RESULTS}/checkpoints/{wildcards.ckpt}" if "ckpt" in wildcards.keys() else RESULTS


def variant_dir(variant, root=RESULTS):
    return f"{root}/cache" if variant == "main" else f"{root}/methods/cache/{variant}"


def method_queries(method, root=RESULTS):
    """The query store a gradient method scores: its cache variant's, LiSSA's inverse-Hessian products, or (_pre)
    the preconditioned ones."""
    if method == "lissa":
        return f"{root}/methods/lissa/queries.zarr/zarr.json"
    if parse_method(method).precondition:
        return f"{root}/methods/{method}/queries.zarr/zarr.json"
    return f"{variant_dir(method_source(method)[0], root)}/queries.zarr/zarr.json"


def method_score_inputs(wildcards):
    """The query store and the training-cache shard a gradient method scores."""
    root = method_root(wildcards)
    variant = method_source(wildcards.grad_method)[0]
    return {
        "queries": method_queries(wildcards.grad_method, root),
        "cache": f"{variant_dir(variant, root)}/train/{wildcards.shard}.zarr/zarr.json",
    }


def token_method_score_inputs(wildcards):
    """The per-token query store and the training-cache shard a _tok method scores (the main cache's per-token
    queries are tokenwise's, rules/tokenwise.smk)."""
    variant = method_source(wildcards.token_method)[0]
    inputs = {"queries": f"{variant_dir(variant)}/token_queries.zarr/zarr.json"}
    if "shard" in wildcards.keys():
        inputs["cache"] = f"{variant_dir(variant)}/train/{wildcards.shard}.zarr/zarr.json"
    return inputs


def method_merge_inputs(wildcards):
    root = method_root(wildcards)
    return {
        "shards": [f"{root}/methods/{wildcards.grad_method}/scores/{shard}.zarr/zarr.json" for shard in SHARDS],
        "queries": method_queries(wildcards.grad_method, root),
    }


def precondition_inputs(wildcards):
    """A _pre method's query store and training caches (its variant's, at its root) to precondition with."""
    root = method_root(wildcards)
    variant = method_source(wildcards.grad_method)[0]
    return {
        "queries": f"{variant_dir(variant, root)}/queries.zarr/zarr.json",
        "caches": [f"{variant_dir(variant, root)}/train/{shard}.zarr/zarr.json" for shard in SHARDS],
    }


def method_costs(method):
    """What the experiment table needs about a method (rapidin.experiments.tables): scores, cache, benchmark files;
    a method summed over checkpoints counts each checkpoint's cache (`copies`) and jobs."""
    bench = f"{RESULTS}/benchmarks"
    cost = {"scores": f"{RESULTS}/methods/{method}/scores.zarr", "cache": None, "array": None, "benchmarks": {}}
    if method in ("random", "bm25"):
        cost["benchmarks"]["other"] = [f"{bench}/score_baseline/{method}.tsv"]
        return cost
    parsed = parse_method(method)
    variant, array = method_source(method)
    single = parsed.single
    if parsed.checkpoints:
        names = list(CHECKPOINTS)
        cost["cache"], cost["array"], cost["copies"] = (
            f"{variant_dir(variant, f'{RESULTS}/checkpoints/{names[0]}')}/train/{SHARDS[0]}.zarr",
            array,
            len(names),
        )
        train, queries = (
            ("cache_checkpoint_train_grads", "cache_checkpoint_query_grads")
            if variant == "main"
            else (f"cache_checkpoint_variant_train_grads/{variant}", f"cache_checkpoint_variant_query_grads/{variant}")
        )  # benchmark folders: <rule>[/<variant>]/<ckpt>/
        cost["benchmarks"] = {
            "train_cache": [f"{bench}/{train}/{c}/{shard}.tsv" for c in names for shard in SHARDS],
            "query_cache": [f"{bench}/{queries}/{c}/queries.tsv" for c in names],
            "score": [f"{bench}/score_checkpoint_method_shard/{c}/{single}/{s}.tsv" for c in names for s in SHARDS],
            "other": (
                [f"{bench}/precondition_checkpoint_queries/{c}/{single}.tsv" for c in names]
                if parsed.precondition
                else []
            ),
        }
        return cost
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
    if parsed.precondition:
        cost["benchmarks"]["other"] = [f"{bench}/precondition_queries/{method}.tsv"]
    if parsed.tokens:
        cost["benchmarks"]["query_cache"] = [
            f"{bench}/cache_query_token_grads.tsv"
            if variant == "main"
            else f"{bench}/cache_variant_query_token_grads/{variant}.tsv"
        ]
        cost["benchmarks"]["score"] = [f"{bench}/score_token_method_shard/{method}/{shard}.tsv" for shard in SHARDS]
        cost["benchmarks"]["other"] = [f"{bench}/aggregate_token_scores/methods/{method}.tsv"]
    return cost


def table_inputs(wildcards):
    """Every file the experiment table reads: each method's scores, metrics, cache and benchmark files."""
    methods = EXPERIMENT["methods"]
    inputs = {"scores": [f"{RESULTS}/methods/{m}/scores.zarr/zarr.json" for m in methods]}
    if EXPERIMENT["study"] != "compression":
        inputs["metrics"] = [f"{RESULTS}/methods/{m}/metrics.json" for m in methods]
    costs = [method_costs(m) for m in methods]
    inputs["caches"] = sorted({f"{c['cache']}/zarr.json" for c in costs if c["cache"]})
    inputs["benchmarks"] = sorted({f for c in costs for files in c["benchmarks"].values() for f in files})
    return inputs


def table_metrics(wildcards, input):
    """--metrics: each method's metrics.json, or None for the compression study."""
    return list(input.metrics) if "metrics" in input.keys() else None


def report_inputs(wildcards):
    """What the report shows: token shading too when token-wise influence is on."""
    inputs = {
        "topk": f"results/{wildcards.name}/influence/topk.jsonl",
        "scores": f"results/{wildcards.name}/influence/scores.zarr/zarr.json",
        "metrics": f"results/{wildcards.name}/metrics.json",
        "train": config["data"]["train"],
    }
    if config["tokenwise"]["enabled"]:
        inputs["tokens"] = f"results/{wildcards.name}/influence/tokens.jsonl"
    return inputs


def tokens_input(wildcards, input):
    """--tokens: tokens.jsonl when token-wise influence is among the report's inputs, else None."""
    return input.tokens if "tokens" in input.keys() else None


def run_settings():
    """The settings shown in the report, as JSON."""
    generate = config["generate"]
    decoding = f"sampling at temperature {generate['temperature']}" if generate["do_sample"] else "greedy"
    return json.dumps(
        {
            "name": config["name"],
            "model": config["model"]["path"],
            "adapter": config["model"]["adapter"],
            "modules": config["model"]["modules"],
            "compressor": config["cache"]["compressor"],
            "k": KS,
            "n_shards": config["cache"]["n_shards"],
            "dtype": config["cache"]["dtype"],
            "seed": config["cache"]["seed"],
            "normalize": config["cache"]["normalize"],
            "optimizer": config["cache"]["optimizer"],
            "checkpoints": [entry["path"] for entry in config["model"]["checkpoints"]] or None,
            "aggregate": config["score"]["aggregate"],
            "train": config["data"]["train"],
            "queries": config["data"]["queries"],
            "generation (queries without a response)": (
                f"{decoding}, at most {generate['max_new_tokens']} new tokens, seed {generate['seed']}"
            ),
            "token-wise samples per query and side": (
                config["tokenwise"]["top_samples"] if config["tokenwise"]["enabled"] else None
            ),
        }
    )


def final_outputs():
    outputs = [
        f"{RESULTS}/plan.json",
        f"{RESULTS}/queries.jsonl",
        f"{RESULTS}/influence/scores.zarr/zarr.json",
        f"{RESULTS}/influence/topk.jsonl",
        f"{RESULTS}/metrics.json",
        f"{RESULTS}/report/index.html",
    ]
    if config["tokenwise"]["enabled"]:
        outputs += [f"{RESULTS}/influence/token_scores.zarr/zarr.json", f"{RESULTS}/influence/tokens.jsonl"]
    if EXPERIMENT["study"]:
        outputs += [f"{RESULTS}/tables/{config['name']}.{ext}" for ext in ("md", "csv")]
        outputs.append(f"{RESULTS}/plots/{config['name']}.png")
    return outputs
