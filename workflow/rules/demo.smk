# The embedded default: a generated poisoned instruction set and a tiny model trained on it.


rule make_demo_data:
    output:
        train="results/{name}/data/train.jsonl",
        queries="results/{name}/data/queries.jsonl",
    params:
        n_train=config["demo"]["n_train"],
        poison_fraction=config["demo"]["poison_fraction"],
        n_attacked=config["demo"]["n_attacked"],
        n_clean=config["demo"]["n_clean"],
        seed=config["demo"]["seed"],
        backdoor_response=config["demo"]["backdoor_response"],
    log:
        "results/{name}/logs/make_demo_data.log",
    shell:
        "rapidin make-demo-data --train-out {output.train} --queries-out {output.queries}"
        " --n-train {params.n_train} --poison-fraction {params.poison_fraction} --n-attacked {params.n_attacked}"
        " --n-clean {params.n_clean} --seed {params.seed} --backdoor-response {params.backdoor_response:q}"
        " 2>&1 | tee {log}"


rule train_demo_model:
    input:
        train=config["data"]["train"],  # not the queries: adding one must not retrain the model
    output:
        model=directory("results/{name}/demo_model"),
    params:
        demo=config["demo"],
    threads: workflow.cores
    log:
        "results/{name}/logs/train_demo_model.log",
    benchmark:
        "results/{name}/benchmarks/train_demo_model.tsv"
    shell:
        "rapidin --threads {threads} train-demo-model --train {input.train}"
        " --out {output.model} --vocab-size {params.demo[vocab_size]} --hidden-size {params.demo[hidden_size]}"
        " --n-layers {params.demo[n_layers]} --n-heads {params.demo[n_heads]}"
        " --intermediate-size {params.demo[intermediate_size]} --max-length {params.demo[max_length]}"
        " --epochs {params.demo[epochs]} --seed {params.demo[seed]} 2>&1 | tee {log}"
