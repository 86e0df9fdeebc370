# Per-sample gradient vectors: one job per training shard, one job for the queries. Every setting the vectors
# depend on is a param named as its CacheSettings field (rapidin/grads.py), passed to the flag of that name.

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
    modules=config["model"]["modules"],
    parameters=config["model"]["parameters"],
    model_dtype=config["model"]["dtype"],
)
CACHE_FLAGS = (
    "--compressor {params.compressor:q} --k {params.k:q} --rank {params.rank:q} --seed {params.seed:q}"
    " --dtype {params.dtype:q} --normalize {params.normalize:q} --batch-tokens {params.batch_tokens:q}"
    " --chunk-rows {params.chunk_rows:q} --on-nonfinite {params.on_nonfinite:q} --modules {params.modules:q}"
    " --parameters {params.parameters:q} --model-dtype {params.model_dtype:q}"
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
        "rapidin --threads {threads} grads --tokens {input.tokens:q} --model {input.model:q}"
        " --adapter {params.adapter:q} --out {output.cache:q} " + CACHE_FLAGS + " --shard {params.shard:q}"
        " --n-shards {params.n_shards:q} 2>&1 | tee {log:q}"


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
        "rapidin --threads {threads} grads --tokens {input.tokens:q} --model {input.model:q}"
        " --adapter {params.adapter:q} --out {output.cache:q} " + CACHE_FLAGS + " 2>&1 | tee {log:q}"
