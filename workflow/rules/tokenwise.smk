# Token-wise influence (method.md §2): per-token gradients of the query responses and of each query's top
# training samples. The query tokens are scored like the queries (score_shard and merge_scores with
# token="token_" give influence/token_scores.zarr); attribute_tokens writes tokens.jsonl.


rule cache_query_token_grads:
    input:
        unpack(model_inputs),
        tokens="results/{name}/tokens/queries.zarr",
    output:
        cache=directory("results/{name}/cache/token_queries.zarr"),
    params:
        flags=grads_flags(),
    threads: workflow.cores
    resources:
        gpu=1,  # at most --resources gpu=N such jobs at once; each leases its own GPU
    log:
        "results/{name}/logs/cache_query_token_grads.log",
    benchmark:
        "results/{name}/benchmarks/cache_query_token_grads.tsv"
    shell:
        "rapidin --threads {threads} grads --per-token --tokens {input.tokens} --out {output.cache} {params.flags}"
        " 2>&1 | tee {log}"


rule cache_train_token_grads:
    input:
        unpack(model_inputs),
        tokens="results/{name}/tokens/train.zarr",
        topk="results/{name}/influence/topk.jsonl",
    output:
        cache=directory("results/{name}/cache/token_train.zarr"),
    params:
        flags=grads_flags(),
        top_samples=config["tokenwise"]["top_samples"],
    threads: workflow.cores
    resources:
        gpu=1,  # at most --resources gpu=N such jobs at once; each leases its own GPU
    log:
        "results/{name}/logs/cache_train_token_grads.log",
    benchmark:
        "results/{name}/benchmarks/cache_train_token_grads.tsv"
    shell:
        "rapidin --threads {threads} grads --per-token --tokens {input.tokens} --topk {input.topk}"
        " --top-samples {params.top_samples} --out {output.cache} {params.flags} 2>&1 | tee {log}"


rule attribute_tokens:
    input:
        topk="results/{name}/influence/topk.jsonl",
        token_scores="results/{name}/influence/token_scores.zarr",
        queries="results/{name}/cache/queries.zarr",
        query_tokens="results/{name}/cache/token_queries.zarr",
        train_tokens="results/{name}/cache/token_train.zarr",
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
        "rapidin tokenwise --topk {input.topk} --token-scores {input.token_scores} --queries {input.queries}"
        " --query-tokens {input.query_tokens} --train-tokens {input.train_tokens} --model {input.model}"
        " --top-samples {params.top_samples} --out {output.tokens} 2>&1 | tee {log}"
