# Several checkpoints (TracInCP, docs method.md §8; model.checkpoints): each checkpoint (wildcard `ckpt`,
# CHECKPOINTS in common.smk) gets its own caches and scores under results/<name>/checkpoints/<ckpt>/, made by
# the cache's settings (CACHE_PARAMS: same seed, same parameter layout); combine_checkpoint_scores writes their
# lr-weighted sum where merge_scores would write (influence/scores.zarr, influence/token_scores.zarr), so top-k,
# metrics, token-wise and the report read it unchanged; with score.aggregate tokens, influence/scores.zarr is the
# mean of each checkpoint's aggregated token scores (rules/tokenwise.smk). Adding a checkpoint computes only its
# caches and scores.
# model.path stays the model that generates, tokenizes and gives tokens.jsonl its per-token heat maps.


rule cache_checkpoint_train_grads:
    input:
        unpack(checkpoint_inputs),
        tokens="results/{name}/tokens/train.zarr/zarr.json",
    output:
        cache="results/{name}/checkpoints/{ckpt}/cache/train/{shard}.zarr/zarr.json",
    params:
        **CACHE_PARAMS,
        model=checkpoint_model,
        adapter=checkpoint_adapter,
        shard=lambda wildcards: int(wildcards.shard),
        n_shards=config["cache"]["n_shards"],
    threads: max(1, workflow.cores // config["cache"]["n_shards"])
    resources:
        gpu=1,  # at most --resources gpu=N such jobs at once; each leases its own GPU
    log:
        "results/{name}/logs/cache_checkpoint_train_grads/{ckpt}/{shard}.log",
    benchmark:
        "results/{name}/benchmarks/cache_checkpoint_train_grads/{ckpt}/{shard}.tsv"
    shell:
        cache_command(
            "grads",
            "--tokens {input.tokens:q} --model {params.model:q} --adapter {params.adapter:q} --out {output.cache:q}",
            "--shard {params.shard:q} --n-shards {params.n_shards:q}",
        )


rule cache_checkpoint_query_grads:
    input:
        unpack(checkpoint_inputs),
        tokens="results/{name}/tokens/queries.zarr/zarr.json",
    output:
        cache="results/{name}/checkpoints/{ckpt}/cache/{token}queries.zarr/zarr.json",
    params:
        **CACHE_PARAMS,
        model=checkpoint_model,
        adapter=checkpoint_adapter,
        per_token=lambda wildcards: wildcards.token == "token_",
    threads: workflow.cores
    resources:
        gpu=1,  # at most --resources gpu=N such jobs at once; each leases its own GPU
    log:
        "results/{name}/logs/cache_checkpoint_query_grads/{ckpt}/{token}queries.log",
    benchmark:
        "results/{name}/benchmarks/cache_checkpoint_query_grads/{ckpt}/{token}queries.tsv"
    shell:
        cache_command(
            "grads --per-token {params.per_token:q}",
            "--tokens {input.tokens:q} --model {params.model:q} --adapter {params.adapter:q} --out {output.cache:q}",
        )


use rule score_shard as score_checkpoint_shard with:
    input:
        queries="results/{name}/checkpoints/{ckpt}/cache/{token}queries.zarr/zarr.json",
        cache="results/{name}/checkpoints/{ckpt}/cache/train/{shard}.zarr/zarr.json",
    output:
        scores="results/{name}/checkpoints/{ckpt}/scores/{token}{shard}.zarr/zarr.json",
    log:
        "results/{name}/logs/score_checkpoint_shard/{ckpt}/{token}{shard}.log",
    benchmark:
        "results/{name}/benchmarks/score_checkpoint_shard/{ckpt}/{token}{shard}.tsv"


use rule merge_scores as merge_checkpoint_scores with:
    input:
        shards=expand("results/{{name}}/checkpoints/{{ckpt}}/scores/{{token}}{shard}.zarr/zarr.json", shard=SHARDS),
        queries="results/{name}/checkpoints/{ckpt}/cache/{token}queries.zarr/zarr.json",
    output:
        scores="results/{name}/checkpoints/{ckpt}/influence/{token}scores.zarr/zarr.json",
    log:
        "results/{name}/logs/merge_checkpoint_scores/{ckpt}/{token}scores.log",


if CHECKPOINTS:

    localrules:
        combine_checkpoint_scores,

    rule combine_checkpoint_scores:
        input:
            scores=expand(
                "results/{{name}}/checkpoints/{ckpt}/influence/{{token}}scores.zarr/zarr.json", ckpt=CHECKPOINTS
            ),
        output:
            scores="results/{name}/influence/{token}scores.zarr/zarr.json",
        params:
            checkpoints=json.dumps(list(CHECKPOINTS.values())),
        log:
            "results/{name}/logs/combine_checkpoint_scores/{token}scores.log",
        shell:
            "rapidin combine --scores {input.scores:q} --checkpoints {params.checkpoints:q} --out {output.scores:q}"
            " 2>&1 | tee {log:q}"

    ruleorder: combine_checkpoint_scores > merge_scores
