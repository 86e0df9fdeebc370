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
        array=None,  # the cache's default array (rapidin.score.vector_array); experiments pick one
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
    log:
        "results/{name}/logs/write_topk.log",
    shell:
        "rapidin topk --scores {input.scores:q} --train {input.train:q} --queries {input.queries:q}"
        " --out {output.topk:q} 2>&1 | tee {log:q}"
