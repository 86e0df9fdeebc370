# The paper's studies (config/experiments/, section `experiment`): every method's scores over the same queries
# and training set, by the pipeline's own caching, scoring and evaluation rules, then one table and plot.
# Gradient methods: cache variants (common.smk: CACHE_VARIANTS) → score_method_shard → merge_method_scores;
# random and bm25: score_baseline; lissa: lissa_queries turns the exact_raw query gradients into H⁻¹∇L(t).
# Error tracing: make_error_tracing_data writes entity swaps into the demo's training set, and its queries.
# Suffixes (rapidin.methods): _adam scores a variant with cache.optimizer adam, _pre preconditioned queries
# (precondition_queries), _cp the lr-weighted sum over model.checkpoints of the method at each checkpoint
# (the same variant, scoring and merging rules under results/<name>/checkpoints/<ckpt>/, then combine_method_scores),
# _tok token-level query aggregation (each response token's gradient scored like a query, then aggregate_token_scores).


wildcard_constraints:
    variant=VARIANT_PATTERN,
    grad_method=METHOD_PATTERN.replace("random|bm25|", ""),  # rapidin.methods: one grammar of method names
    cp_method=CHECKPOINT_METHOD_PATTERN,
    token_method=CHECKPOINT_METHOD_PATTERN,
    baseline="random|bm25",


rule make_error_tracing_data:
    input:
        train="results/{name}/data/train.jsonl",
    output:
        train="results/{name}/data/swapped_train.jsonl",
        queries="results/{name}/data/swapped_queries.jsonl",
    params:
        source=EXPERIMENT["swap"]["source"],
        target=EXPERIMENT["swap"]["target"],
        fraction=EXPERIMENT["swap"]["fraction"],
        probability=EXPERIMENT["swap"]["probability"],
        seed=config["demo"]["seed"],
    log:
        "results/{name}/logs/make_error_tracing_data.log",
    shell:
        "rapidin make-error-tracing-data --train {input.train:q} --train-out {output.train:q}"
        " --queries-out {output.queries:q} --source {params.source:q} --target {params.target:q}"
        " --fraction {params.fraction:q} --probability {params.probability:q} --seed {params.seed:q} 2>&1 | tee {log:q}"


use rule cache_train_grads as cache_variant_train_grads with:
    output:
        cache="results/{name}/methods/cache/{variant}/train/{shard}.zarr/zarr.json",
    log:
        "results/{name}/logs/cache_variant_train_grads/{variant}/{shard}.log",
    benchmark:
        "results/{name}/benchmarks/cache_variant_train_grads/{variant}/{shard}.tsv"


use rule cache_query_grads as cache_variant_query_grads with:
    output:
        cache="results/{name}/methods/cache/{variant}/queries.zarr/zarr.json",
    log:
        "results/{name}/logs/cache_variant_query_grads/{variant}.log",
    benchmark:
        "results/{name}/benchmarks/cache_variant_query_grads/{variant}.tsv"


rule lissa_queries:
    input:
        unpack(model_inputs),
        queries="results/{name}/methods/cache/exact_raw/queries.zarr/zarr.json",
        tokens="results/{name}/tokens/train.zarr/zarr.json",
    output:
        queries="results/{name}/methods/lissa/queries.zarr/zarr.json",
    params:
        adapter=adapter_input,
        depth=EXPERIMENT["lissa"]["depth"],
        scale=EXPERIMENT["lissa"]["scale"],
        damping=EXPERIMENT["lissa"]["damping"],
        batch_size=EXPERIMENT["lissa"]["batch_size"],
        seed=EXPERIMENT["lissa"]["seed"],
    threads: workflow.cores
    log:
        "results/{name}/logs/lissa_queries.log",
    benchmark:
        "results/{name}/benchmarks/lissa_queries.tsv"
    shell:
        "rapidin --threads {threads} lissa --queries {input.queries:q} --tokens {input.tokens:q}"
        " --model {input.model:q} --adapter {params.adapter:q} --out {output.queries:q} --depth {params.depth:q}"
        " --scale {params.scale:q} --damping {params.damping:q} --batch-size {params.batch_size:q}"
        " --seed {params.seed:q} 2>&1 | tee {log:q}"


use rule score_shard as score_method_shard with:
    input:
        unpack(method_score_inputs),
    output:
        scores="results/{name}/methods/{grad_method}/scores/{shard}.zarr/zarr.json",
    params:
        top_k=config["score"]["top_k"],
        array=lambda wildcards: method_source(wildcards.grad_method)[1],
    log:
        "results/{name}/logs/score_method_shard/{grad_method}/{shard}.log",
    benchmark:
        "results/{name}/benchmarks/score_method_shard/{grad_method}/{shard}.tsv"


use rule merge_scores as merge_method_scores with:
    input:
        unpack(method_merge_inputs),
    output:
        scores="results/{name}/methods/{grad_method}/scores.zarr/zarr.json",
    log:
        "results/{name}/logs/merge_method_scores/{grad_method}.log",


# Token-level query aggregation (methods ending in _tok): the variant's per-token query gradients, scored and
# merged like queries into methods/<method>_tok/token_scores.zarr, then aggregated per query into scores.zarr
# (rules/tokenwise.smk: aggregate_token_scores).
use rule cache_query_token_grads as cache_variant_query_token_grads with:
    output:
        cache="results/{name}/methods/cache/{variant}/token_queries.zarr/zarr.json",
    log:
        "results/{name}/logs/cache_variant_query_token_grads/{variant}.log",
    benchmark:
        "results/{name}/benchmarks/cache_variant_query_token_grads/{variant}.tsv"


use rule score_shard as score_token_method_shard with:
    input:
        unpack(token_method_score_inputs),
    output:
        scores="results/{name}/methods/{token_method}_tok/token_scores/{shard}.zarr/zarr.json",
    params:
        top_k=config["score"]["top_k"],
        array=lambda wildcards: method_source(wildcards.token_method)[1],
    log:
        "results/{name}/logs/score_token_method_shard/{token_method}_tok/{shard}.log",
    benchmark:
        "results/{name}/benchmarks/score_token_method_shard/{token_method}_tok/{shard}.tsv"


use rule merge_scores as merge_token_method_scores with:
    input:
        shards=expand("results/{{name}}/methods/{{token_method}}_tok/token_scores/{shard}.zarr/zarr.json", shard=SHARDS),
        queries=lambda wildcards: token_method_score_inputs(wildcards)["queries"],
    output:
        scores="results/{name}/methods/{token_method}_tok/token_scores.zarr/zarr.json",
    log:
        "results/{name}/logs/merge_token_method_scores/{token_method}_tok.log",


rule precondition_queries:
    input:
        unpack(precondition_inputs),
    output:
        queries="results/{name}/methods/{grad_method}/queries.zarr/zarr.json",
    wildcard_constraints:
        grad_method=r"[^/]+_pre",
    params:
        array=lambda wildcards: method_source(wildcards.grad_method)[1],
        damping=EXPERIMENT["precondition"]["damping"],
        max_rows=EXPERIMENT["precondition"]["max_rows"],
    threads: workflow.cores
    log:
        "results/{name}/logs/precondition_queries/{grad_method}.log",
    benchmark:
        "results/{name}/benchmarks/precondition_queries/{grad_method}.tsv"
    shell:
        "rapidin --threads {threads} precondition --queries {input.queries:q} --caches {input.caches:q}"
        " --out {output.queries:q} --array {params.array:q} --damping {params.damping:q}"
        " --max-rows {params.max_rows:q} 2>&1 | tee {log:q}"


# The same per checkpoint (methods ending in _cp): variant caches, preconditioned queries, scores, merge.
use rule cache_checkpoint_train_grads as cache_checkpoint_variant_train_grads with:
    output:
        cache="results/{name}/checkpoints/{ckpt}/methods/cache/{variant}/train/{shard}.zarr/zarr.json",
    log:
        "results/{name}/logs/cache_checkpoint_variant_train_grads/{variant}/{ckpt}/{shard}.log",
    benchmark:
        "results/{name}/benchmarks/cache_checkpoint_variant_train_grads/{variant}/{ckpt}/{shard}.tsv"


use rule cache_checkpoint_query_grads as cache_checkpoint_variant_query_grads with:
    output:
        cache="results/{name}/checkpoints/{ckpt}/methods/cache/{variant}/{token}queries.zarr/zarr.json",
    log:
        "results/{name}/logs/cache_checkpoint_variant_query_grads/{variant}/{ckpt}/{token}queries.log",
    benchmark:
        "results/{name}/benchmarks/cache_checkpoint_variant_query_grads/{variant}/{ckpt}/{token}queries.tsv"


use rule precondition_queries as precondition_checkpoint_queries with:
    output:
        queries="results/{name}/checkpoints/{ckpt}/methods/{grad_method}/queries.zarr/zarr.json",
    log:
        "results/{name}/logs/precondition_checkpoint_queries/{ckpt}/{grad_method}.log",
    benchmark:
        "results/{name}/benchmarks/precondition_checkpoint_queries/{ckpt}/{grad_method}.tsv"


use rule score_shard as score_checkpoint_method_shard with:
    input:
        unpack(method_score_inputs),
    output:
        scores="results/{name}/checkpoints/{ckpt}/methods/{grad_method}/scores/{shard}.zarr/zarr.json",
    params:
        top_k=config["score"]["top_k"],
        array=lambda wildcards: method_source(wildcards.grad_method)[1],
    log:
        "results/{name}/logs/score_checkpoint_method_shard/{ckpt}/{grad_method}/{shard}.log",
    benchmark:
        "results/{name}/benchmarks/score_checkpoint_method_shard/{ckpt}/{grad_method}/{shard}.tsv"


use rule merge_scores as merge_checkpoint_method_scores with:
    input:
        unpack(method_merge_inputs),
    output:
        scores="results/{name}/checkpoints/{ckpt}/methods/{grad_method}/scores.zarr/zarr.json",
    log:
        "results/{name}/logs/merge_checkpoint_method_scores/{ckpt}/{grad_method}.log",


if CHECKPOINTS:

    localrules:
        combine_method_scores,

    use rule combine_checkpoint_scores as combine_method_scores with:
        input:
            scores=expand(
                "results/{{name}}/checkpoints/{ckpt}/methods/{{cp_method}}/scores.zarr/zarr.json", ckpt=CHECKPOINTS
            ),
        output:
            scores="results/{name}/methods/{cp_method}_cp/scores.zarr/zarr.json",
        log:
            "results/{name}/logs/combine_method_scores/{cp_method}.log",


rule score_baseline:
    input:
        train=config["data"]["train"],
        queries="results/{name}/queries.jsonl",
    output:
        scores="results/{name}/methods/{baseline}/scores.zarr/zarr.json",
    params:
        seed=EXPERIMENT["seed"],
        fields=FIELDS,
    log:
        "results/{name}/logs/score_baseline/{baseline}.log",
    benchmark:
        "results/{name}/benchmarks/score_baseline/{baseline}.tsv"
    shell:
        "rapidin baseline --method {wildcards.baseline:q} --train {input.train:q} --queries {input.queries:q}"
        " --out {output.scores:q} --seed {params.seed:q} --fields {params.fields:q} 2>&1 | tee {log:q}"


use rule evaluate_backdoor as evaluate_method with:
    input:
        scores="results/{name}/methods/{method}/scores.zarr/zarr.json",
        train=config["data"]["train"],
        queries=config["data"]["queries"],
    output:
        metrics="results/{name}/methods/{method}/metrics.json",
    params:
        model=None,  # the attack success rate is the model's, not the method's: results/<name>/metrics.json has it
        adapter=None,
        template=config["data"]["template"],
        fields=FIELDS,
    log:
        "results/{name}/logs/evaluate_method/{method}.log",


rule write_experiment_table:
    input:
        unpack(table_inputs),
    output:
        md=report("results/{name}/tables/{name}.md", caption="../report/experiment.rst", category="Experiment"),
        csv=report("results/{name}/tables/{name}.csv", caption="../report/experiment.rst", category="Experiment"),
        plot=report("results/{name}/plots/{name}.png", caption="../report/experiment.rst", category="Experiment"),
    params:
        study=EXPERIMENT["study"],
        methods=EXPERIMENT["methods"],
        metrics=table_metrics,
        reference=EXPERIMENT["reference"],
        costs=json.dumps({m: method_costs(m) for m in EXPERIMENT["methods"]}),
    log:
        "results/{name}/logs/write_experiment_table.log",
    shell:
        "rapidin table --study {params.study:q} --methods {params.methods:q} --metrics {params.metrics:q}"
        " --reference {params.reference:q} --costs {params.costs:q} --csv {output.csv:q} --md {output.md:q}"
        " --plot {output.plot:q} --title {wildcards.name:q} 2>&1 | tee {log:q}"
