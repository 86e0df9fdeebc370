# The paper's studies (config/experiments/, section `experiment`): every method's scores over the same queries
# and training set, by the pipeline's own caching, scoring and evaluation rules, then one table and plot.
# Gradient methods: cache variants (common.smk: CACHE_VARIANTS) → score_method_shard → merge_method_scores;
# random and bm25: score_baseline; lissa: lissa_queries turns the exact_raw query gradients into H⁻¹∇L(t).
# Error tracing: make_error_tracing_data writes entity swaps into the demo's training set, and its queries.


wildcard_constraints:
    variant=r"exact|exact_raw|factored|seed\d+",
    grad_method=r"tracin|tracin_ln|lissa|factored|rapidin_k\d+(_seed\d+)?",
    baseline="random|bm25",


rule make_error_tracing_data:
    input:
        train="results/{name}/data/train.jsonl",
    output:
        train="results/{name}/data/swapped_train.jsonl",
        queries="results/{name}/data/swapped_queries.jsonl",
    params:
        swap=EXPERIMENT["swap"],
        seed=config["demo"]["seed"],
    log:
        "results/{name}/logs/make_error_tracing_data.log",
    shell:
        "rapidin make-error-tracing-data --train {input.train} --train-out {output.train} --queries-out {output.queries}"
        " --source {params.swap[source]} --target {params.swap[target]} --fraction {params.swap[fraction]}"
        " --probability {params.swap[probability]} --seed {params.seed} 2>&1 | tee {log}"


use rule cache_train_grads as cache_variant_train_grads with:
    output:
        cache=directory("results/{name}/methods/cache/{variant}/train/{shard}.zarr"),
    params:
        flags=variant_grads_flags,
        n_shards=config["cache"]["n_shards"],
    log:
        "results/{name}/logs/cache_variant_train_grads/{variant}/{shard}.log",
    benchmark:
        "results/{name}/benchmarks/cache_variant_train_grads/{variant}/{shard}.tsv"


use rule cache_query_grads as cache_variant_query_grads with:
    output:
        cache=directory("results/{name}/methods/cache/{variant}/queries.zarr"),
    params:
        flags=variant_grads_flags,
    log:
        "results/{name}/logs/cache_variant_query_grads/{variant}.log",
    benchmark:
        "results/{name}/benchmarks/cache_variant_query_grads/{variant}.tsv"


rule lissa_queries:
    input:
        unpack(model_inputs),
        queries="results/{name}/methods/cache/exact_raw/queries.zarr",
        tokens="results/{name}/tokens/train.zarr",
    output:
        queries=directory("results/{name}/methods/lissa/queries.zarr"),
    params:
        model=model_flags(),
        lissa=EXPERIMENT["lissa"],
    threads: workflow.cores
    log:
        "results/{name}/logs/lissa_queries.log",
    benchmark:
        "results/{name}/benchmarks/lissa_queries.tsv"
    shell:
        "rapidin --threads {threads} lissa --queries {input.queries} --tokens {input.tokens} {params.model}"
        " --out {output.queries} --depth {params.lissa[depth]} --scale {params.lissa[scale]}"
        " --damping {params.lissa[damping]} --batch-size {params.lissa[batch_size]} --seed {params.lissa[seed]}"
        " 2>&1 | tee {log}"


use rule score_shard as score_method_shard with:
    input:
        unpack(method_score_inputs),
    output:
        scores=directory("results/{name}/methods/{grad_method}/scores/{shard}.zarr"),
    params:
        top_k=config["score"]["top_k"],
        array=method_array_flag,
    log:
        "results/{name}/logs/score_method_shard/{grad_method}/{shard}.log",
    benchmark:
        "results/{name}/benchmarks/score_method_shard/{grad_method}/{shard}.tsv"


use rule merge_scores as merge_method_scores with:
    input:
        unpack(method_merge_inputs),
    output:
        scores=directory("results/{name}/methods/{grad_method}/scores.zarr"),
    log:
        "results/{name}/logs/merge_method_scores/{grad_method}.log",


rule score_baseline:
    input:
        train=config["data"]["train"],
        queries="results/{name}/queries.jsonl",
    output:
        scores=directory("results/{name}/methods/{baseline}/scores.zarr"),
    params:
        seed=EXPERIMENT["seed"],
    log:
        "results/{name}/logs/score_baseline/{baseline}.log",
    benchmark:
        "results/{name}/benchmarks/score_baseline/{baseline}.tsv"
    shell:
        "rapidin baseline --method {wildcards.baseline} --train {input.train} --queries {input.queries}"
        " --out {output.scores} --seed {params.seed} 2>&1 | tee {log}"


use rule evaluate_backdoor as evaluate_method with:
    input:
        scores="results/{name}/methods/{method}/scores.zarr",
        train=config["data"]["train"],
        queries=config["data"]["queries"],
    output:
        metrics="results/{name}/methods/{method}/metrics.json",
    params:
        model="",  # the attack success rate is the model's, not the method's: results/<name>/metrics.json has it
        template=config["data"]["template"],
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
        flags=table_flags,
        costs=experiment_costs(),
    log:
        "results/{name}/logs/write_experiment_table.log",
    shell:
        "rapidin table --study {params.study} --methods {params.methods} {params.flags} --costs {params.costs:q}"
        " --csv {output.csv} --md {output.md} --plot {output.plot} --title '{wildcards.name}' 2>&1 | tee {log}"
