# Token-wise influence (method.md §2): per-token gradients of the query responses and of each query's top
# training samples. The query tokens are scored like the queries (score_shard and merge_scores with
# token="token_" give influence/token_scores.zarr); attribute_tokens writes tokens.jsonl. With score.aggregate
# tokens, aggregate_token_scores turns influence/token_scores.zarr into influence/scores.zarr.
# The per-token caches take the cache's own settings (CACHE_PARAMS, CACHE_FLAGS: rules/cache.smk).


rule cache_query_token_grads:
    input:
        unpack(model_inputs),
        tokens="results/{name}/tokens/queries.zarr/zarr.json",
    output:
        cache="results/{name}/cache/token_queries.zarr/zarr.json",
    params:
        **CACHE_PARAMS,
        adapter=adapter_input,
    threads: workflow.cores
    resources:
        gpu=1,  # at most --resources gpu=N such jobs at once; each leases its own GPU
    log:
        "results/{name}/logs/cache_query_token_grads.log",
    benchmark:
        "results/{name}/benchmarks/cache_query_token_grads.tsv"
    shell:
        cache_command(
            "grads --per-token true",
            "--tokens {input.tokens:q} --model {input.model:q} --adapter {params.adapter:q} --out {output.cache:q}",
        )


rule cache_train_token_grads:
    input:
        unpack(model_inputs),
        tokens="results/{name}/tokens/train.zarr/zarr.json",
        topk="results/{name}/influence/topk.jsonl",
    output:
        cache="results/{name}/cache/token_train.zarr/zarr.json",
    params:
        **CACHE_PARAMS,
        adapter=adapter_input,
        top_samples=config["tokenwise"]["top_samples"],
    threads: workflow.cores
    resources:
        gpu=1,  # at most --resources gpu=N such jobs at once; each leases its own GPU
    log:
        "results/{name}/logs/cache_train_token_grads.log",
    benchmark:
        "results/{name}/benchmarks/cache_train_token_grads.tsv"
    shell:
        cache_command(
            "grads --per-token true",
            "--tokens {input.tokens:q} --model {input.model:q} --adapter {params.adapter:q} --out {output.cache:q}",
            "--topk {input.topk:q} --top-samples {params.top_samples:q}",
        )


rule attribute_tokens:
    input:
        topk="results/{name}/influence/topk.jsonl",
        token_scores="results/{name}/influence/token_scores.zarr/zarr.json",
        queries="results/{name}/cache/queries.zarr/zarr.json",
        query_tokens="results/{name}/cache/token_queries.zarr/zarr.json",
        train_tokens="results/{name}/cache/token_train.zarr/zarr.json",
        model=model_dir(),
    output:
        tokens=report("results/{name}/influence/tokens.jsonl", caption="../report/tokens.rst", category="Influence"),
    params:
        top_samples=config["tokenwise"]["top_samples"],
    log:
        "results/{name}/logs/attribute_tokens.log",
    benchmark:
        "results/{name}/benchmarks/attribute_tokens.tsv"
    shell:
        "rapidin tokenwise --topk {input.topk:q} --token-scores {input.token_scores:q} --queries {input.queries:q}"
        " --query-tokens {input.query_tokens:q} --train-tokens {input.train_tokens:q} --model {input.model:q}"
        " --top-samples {params.top_samples:q} --out {output.tokens:q} 2>&1 | tee {log:q}"


# Token-level query aggregation (rapidin.score.tokenwise.aggregate_token_scores): per query, its response tokens'
# scores → scores.zarr, where merge_scores would write it: influence/ (score.aggregate tokens; with model.checkpoints,
# each checkpoint's influence/, which combine_checkpoint_scores then averages) and the experiments' methods/<method>_tok/.
AGGREGATED = rf"methods/({CHECKPOINT_METHOD_PATTERN})_tok"
if AGGREGATE_TOKENS:
    AGGREGATED += r"|checkpoints/[^/]+/influence" if CHECKPOINTS else "|influence"


rule aggregate_token_scores:
    input:
        token_scores="results/{name}/{aggregated}/token_scores.zarr/zarr.json",
    output:
        scores="results/{name}/{aggregated}/scores.zarr/zarr.json",
    wildcard_constraints:
        aggregated=AGGREGATED,
    log:
        "results/{name}/logs/aggregate_token_scores/{aggregated}.log",
    benchmark:
        "results/{name}/benchmarks/aggregate_token_scores/{aggregated}.tsv"
    shell:
        "rapidin aggregate-tokens --token-scores {input.token_scores:q} --out {output.scores:q} 2>&1 | tee {log:q}"


if AGGREGATE_TOKENS:  # (checkpoints/<ckpt>/)influence/scores.zarr is aggregate_token_scores', not a merge's

    ruleorder: aggregate_token_scores > merge_scores

    ruleorder: aggregate_token_scores > merge_checkpoint_scores
