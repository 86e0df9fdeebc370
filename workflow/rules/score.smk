# Scores: all queries against each cache shard (one job per shard), merged, then the top-k with their texts.
# The same rules score the per-token query store: wildcard `token` is "" (queries) or "token_" (query tokens).


rule score_shard:
    input:
        queries="results/{name}/cache/{token}queries.zarr/zarr.json",
        cache="results/{name}/cache/train/{shard}.zarr/zarr.json",
    output:
        scores="results/{name}/scores/{token}{shard}.zarr/zarr.json",
    params:
        top_k=config["score"]["top_k"],
        array=None,  # the cache's default array (rapidin.score.scores.vector_array); experiments pick one
    threads: max(1, workflow.cores // config["cache"]["n_shards"])
    resources:
        gpu=1,  # at most --resources gpu=N such jobs at once; each leases its own GPU
    log:
        "results/{name}/logs/score_shard/{token}{shard}.log",
    benchmark:
        "results/{name}/benchmarks/score_shard/{token}{shard}.tsv"
    shell:
        "rapidin --threads {threads} score --queries {input.queries:q} --cache {input.cache:q}"
        " --out {output.scores:q} --top-k {params.top_k:q} --array {params.array:q} 2>&1 | tee {log:q}"


# The query stores scored: whole responses (unless score.aggregate tokens) and their tokens (SCORE_TOKENS).
QUERY_STORES = ([] if AGGREGATE_TOKENS else [""]) + (["token_"] if SCORE_TOKENS else [])

if not config["cache"]["store"]:

    # cache.store false: the training gradients are scored as they are computed, never stored; one pass per
    # shard serves the queries and (token-wise) the query tokens, writing the same score stores as score_shard.
    rule stream_shard:
        input:
            unpack(model_inputs),
            tokens="results/{name}/tokens/train.zarr/zarr.json",
            queries=expand("results/{{name}}/cache/{token}queries.zarr/zarr.json", token=QUERY_STORES),
        output:
            scores=expand("results/{{name}}/scores/{token}{{shard}}.zarr/zarr.json", token=QUERY_STORES),
        params:
            **CACHE_PARAMS,
            adapter=adapter_input,
            top_k=config["score"]["top_k"],
            shard=lambda wildcards: int(wildcards.shard),
            n_shards=config["cache"]["n_shards"],
        threads: max(1, workflow.cores // config["cache"]["n_shards"])
        resources:
            gpu=1,  # at most --resources gpu=N such jobs at once; each leases its own GPU
        log:
            "results/{name}/logs/stream_shard/{shard}.log",
        benchmark:
            "results/{name}/benchmarks/stream_shard/{shard}.tsv"
        shell:
            cache_command(
                "stream",
                "--tokens {input.tokens:q} --model {input.model:q} --adapter {params.adapter:q}",
                "--queries {input.queries:q} --out {output.scores:q} --top-k {params.top_k:q}",
                "--shard {params.shard:q} --n-shards {params.n_shards:q}",
            )

    ruleorder: stream_shard > score_shard


rule merge_scores:
    input:
        shards=expand("results/{{name}}/scores/{{token}}{shard}.zarr/zarr.json", shard=SHARDS),
        queries="results/{name}/cache/{token}queries.zarr/zarr.json",
    output:
        scores="results/{name}/influence/{token}scores.zarr/zarr.json",
    log:
        "results/{name}/logs/merge_scores/{token}scores.log",
    shell:
        "rapidin merge --shards {input.shards:q} --queries {input.queries:q} --out {output.scores:q} 2>&1 | tee {log:q}"


rule write_topk:
    input:
        scores="results/{name}/influence/scores.zarr/zarr.json",
        train=config["data"]["train"],
        queries="results/{name}/queries.jsonl",
    output:
        topk=report(
            "results/{name}/influence/topk.jsonl",
            caption="../report/topk.rst",
            category="Influence",
        ),
    params:
        fields=FIELDS,
    log:
        "results/{name}/logs/write_topk.log",
    shell:
        "rapidin topk --scores {input.scores:q} --train {input.train:q} --queries {input.queries:q}"
        " --out {output.topk:q} --fields {params.fields:q} 2>&1 | tee {log:q}"
