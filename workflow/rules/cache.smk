# Per-sample gradient vectors: one job per training shard, one job for the queries.


rule cache_train_grads:
    input:
        unpack(model_inputs),
        tokens="results/{name}/tokens/train.zarr",
    output:
        cache=directory("results/{name}/cache/train/{shard}.zarr"),
    params:
        flags=grads_flags(),
        n_shards=config["cache"]["n_shards"],
    threads: max(1, workflow.cores // config["cache"]["n_shards"])
    resources:
        gpu=1,  # at most --resources gpu=N such jobs at once; each leases its own GPU
    log:
        "results/{name}/logs/cache_train_grads/{shard}.log",
    benchmark:
        "results/{name}/benchmarks/cache_train_grads/{shard}.tsv"
    shell:
        "rapidin --threads {threads} grads --tokens {input.tokens} --out {output.cache} {params.flags}"
        " --shard {wildcards.shard} --n-shards {params.n_shards} 2>&1 | tee {log}"


rule cache_query_grads:
    input:
        unpack(model_inputs),
        tokens="results/{name}/tokens/queries.zarr",
    output:
        cache=directory("results/{name}/cache/queries.zarr"),
    params:
        flags=grads_flags(),
    threads: workflow.cores
    resources:
        gpu=1,  # at most --resources gpu=N such jobs at once; each leases its own GPU
    log:
        "results/{name}/logs/cache_query_grads.log",
    benchmark:
        "results/{name}/benchmarks/cache_query_grads.tsv"
    shell:
        "rapidin --threads {threads} grads --tokens {input.tokens} --out {output.cache} {params.flags}"
        " 2>&1 | tee {log}"
