# Per-sample gradient vectors: one job per training shard, one job for the queries. Every setting the vectors
# depend on is a param named as its CacheSettings field (rapidin/settings.py), passed to the flag of that name
# (CACHE_PARAMS, CACHE_FLAGS and cache_command in common.smk).

rule plan_run:
    input:
        unpack(model_inputs),
        train_tokens="results/{name}/tokens/train.zarr/zarr.json",
        query_tokens="results/{name}/tokens/queries.zarr/zarr.json",
    output:
        plan="results/{name}/plan.json",
    params:
        **CACHE_PARAMS,
        adapter=adapter_input,
        n_shards=config["cache"]["n_shards"],
        store=config["cache"]["store"],
        score_tokens=SCORE_TOKENS,
    log:
        "results/{name}/logs/plan_run.log",
    shell:
        cache_command(
            "plan",
            "--train-tokens {input.train_tokens:q} --query-tokens {input.query_tokens:q} --model {input.model:q}",
            "--adapter {params.adapter:q} --out {output.plan:q} --n-shards {params.n_shards:q}",
            "--store {params.store:q} --score-tokens {params.score_tokens:q}",
        )


rule cache_train_grads:
    input:
        unpack(model_inputs),
        tokens="results/{name}/tokens/train.zarr/zarr.json",
    output:
        cache="results/{name}/cache/train/{shard}.zarr/zarr.json",
    params:
        **CACHE_PARAMS,
        adapter=adapter_input,
        shard=lambda wildcards: int(wildcards.shard),
        n_shards=config["cache"]["n_shards"],
    threads: max(1, workflow.cores // config["cache"]["n_shards"])
    resources:
        gpu=1,  # at most --resources gpu=N such jobs at once; each leases its own GPU
    log:
        "results/{name}/logs/cache_train_grads/{shard}.log",
    benchmark:
        "results/{name}/benchmarks/cache_train_grads/{shard}.tsv"
    shell:
        cache_command(
            "grads",
            "--tokens {input.tokens:q} --model {input.model:q} --adapter {params.adapter:q} --out {output.cache:q}",
            "--shard {params.shard:q} --n-shards {params.n_shards:q}",
        )


rule cache_query_grads:
    input:
        unpack(model_inputs),
        tokens="results/{name}/tokens/queries.zarr/zarr.json",
    output:
        cache="results/{name}/cache/queries.zarr/zarr.json",
    params:
        **CACHE_PARAMS,
        adapter=adapter_input,
    threads: workflow.cores
    resources:
        gpu=1,  # at most --resources gpu=N such jobs at once; each leases its own GPU
    log:
        "results/{name}/logs/cache_query_grads.log",
    benchmark:
        "results/{name}/benchmarks/cache_query_grads.tsv"
    shell:
        cache_command(
            "grads",
            "--tokens {input.tokens:q} --model {input.model:q} --adapter {params.adapter:q} --out {output.cache:q}",
        )
