# Scores: all queries against each cache shard (one job per shard), then merged with the top-k texts.


rule score_shard:
    input:
        queries="results/{name}/cache/queries.zarr",
        cache="results/{name}/cache/train/{shard}.zarr",
    output:
        scores=directory("results/{name}/scores/{shard}.zarr"),
    params:
        top_k=config["score"]["top_k"],
    threads: max(1, workflow.cores // config["cache"]["n_shards"])
    log:
        "results/{name}/logs/score_shard/{shard}.log",
    benchmark:
        "results/{name}/benchmarks/score_shard/{shard}.tsv"
    shell:
        "{RAPIDIN} --threads {threads} score --queries {input.queries} --cache {input.cache} --out {output.scores}"
        " --top-k {params.top_k} 2>&1 | tee {log}"


rule merge_scores:
    input:
        shards=expand("results/{{name}}/scores/{shard}.zarr", shard=SHARDS),
        train=config["data"]["train"],
        queries=config["data"]["queries"],
    output:
        scores=directory("results/{name}/influence/scores.zarr"),
        topk=report(
            "results/{name}/influence/topk.jsonl",
            caption="../report/topk.rst",
            category="Influence",
        ),
    log:
        "results/{name}/logs/merge_scores.log",
    shell:
        "{RAPIDIN} merge --shards {input.shards} --train {input.train} --queries {input.queries}"
        " --out-scores {output.scores} --out-topk {output.topk} 2>&1 | tee {log}"
