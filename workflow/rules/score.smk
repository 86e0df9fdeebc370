# Scores: all queries against each cache shard (one job per shard), merged, then the top-k with their texts.
# The same rules score the per-token query store: wildcard `token` is "" (queries) or "token_" (query tokens).


rule score_shard:
    input:
        queries="results/{name}/cache/{token}queries.zarr",
        cache="results/{name}/cache/train/{shard}.zarr",
    output:
        scores=directory("results/{name}/scores/{token}{shard}.zarr"),
    params:
        top_k=config["score"]["top_k"],
        array="",  # the cache's default array (rapidin.score.vector_array); experiments pick one
    threads: max(1, workflow.cores // config["cache"]["n_shards"])
    resources:
        gpu=1,  # at most --resources gpu=N such jobs at once; each leases its own GPU
    log:
        "results/{name}/logs/score_shard/{token}{shard}.log",
    benchmark:
        "results/{name}/benchmarks/score_shard/{token}{shard}.tsv"
    shell:
        "rapidin --threads {threads} score --queries {input.queries} --cache {input.cache} --out {output.scores}"
        " --top-k {params.top_k} {params.array} 2>&1 | tee {log}"


rule merge_scores:
    input:
        shards=expand("results/{{name}}/scores/{{token}}{shard}.zarr", shard=SHARDS),
        queries="results/{name}/cache/{token}queries.zarr",
    output:
        scores=directory("results/{name}/influence/{token}scores.zarr"),
    log:
        "results/{name}/logs/merge_scores/{token}scores.log",
    shell:
        "rapidin merge --shards {input.shards} --queries {input.queries} --out {output.scores} 2>&1 | tee {log}"


rule write_topk:
    input:
        scores="results/{name}/influence/scores.zarr",
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
        "rapidin topk --scores {input.scores} --train {input.train} --queries {input.queries} --out {output.topk}"
        " 2>&1 | tee {log}"
