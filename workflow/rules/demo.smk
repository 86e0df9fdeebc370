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
        backdoor_response=config["demo"]["backdoor_response"],
        backdoor=config["demo"]["backdoor"],
        format=config["demo"]["format"],
        seed=config["demo"]["seed"],
    log:
        "results/{name}/logs/make_demo_data.log",
    shell:
        "rapidin make-demo-data --train-out {output.train:q} --queries-out {output.queries:q}"
        " --n-train {params.n_train:q} --poison-fraction {params.poison_fraction:q} --n-attacked {params.n_attacked:q}"
        " --n-clean {params.n_clean:q} --backdoor-response {params.backdoor_response:q}"
        " --backdoor {params.backdoor:q} --format {params.format:q} --seed {params.seed:q}"
        " 2>&1 | tee {log:q}"


rule train_demo_model:
    input:
        train=config["data"]["train"],  # not the queries: adding one must not retrain the model
    output:
        model=directory("results/{name}/demo_model"),
    params:
        vocab_size=config["demo"]["vocab_size"],
        hidden_size=config["demo"]["hidden_size"],
        n_layers=config["demo"]["n_layers"],
        n_heads=config["demo"]["n_heads"],
        intermediate_size=config["demo"]["intermediate_size"],
        max_length=config["demo"]["max_length"],
        epochs=config["demo"]["epochs"],
        seed=config["demo"]["seed"],
        template=config["data"]["template"],
    threads: workflow.cores
    log:
        "results/{name}/logs/train_demo_model.log",
    benchmark:
        "results/{name}/benchmarks/train_demo_model.tsv"
    shell:
        "rapidin --threads {threads} train-demo-model --train {input.train:q} --out {output.model:q}"
        " --vocab-size {params.vocab_size:q} --hidden-size {params.hidden_size:q} --n-layers {params.n_layers:q}"
        " --n-heads {params.n_heads:q} --intermediate-size {params.intermediate_size:q}"
        " --max-length {params.max_length:q} --epochs {params.epochs:q} --seed {params.seed:q}"
        " --template {params.template:q} 2>&1 | tee {log:q}"
