# A real pretrained model (model.path: smollm2) and LoRA fine-tuning on data.train (model.adapter: finetune).


rule convert_smollm2:
    output:
        model=directory("results/{name}/smollm2_model"),
    log:
        "results/{name}/logs/convert_smollm2.log",
    benchmark:
        "results/{name}/benchmarks/convert_smollm2.tsv"
    shell:
        "rapidin convert-gguf --out {output.model:q} 2>&1 | tee {log:q}"


rule finetune_lora:
    input:
        model=model_dir(),
        train=config["data"]["train"],  # not the queries: adding one must not retrain the adapter
    output:
        adapter=directory("results/{name}/lora_adapter"),
    params:
        template=config["data"]["template"],
        max_length=config["data"]["max_length"],
        on_long=config["data"]["on_long"],
        fields=FIELDS,
        rank=config["finetune"]["rank"],
        alpha=config["finetune"]["alpha"],
        target_modules=config["finetune"]["target_modules"],
        epochs=config["finetune"]["epochs"],
        batch_size=config["finetune"]["batch_size"],
        lr=config["finetune"]["lr"],
        seed=config["finetune"]["seed"],
    threads: workflow.cores
    resources:
        gpu=1,  # at most --resources gpu=N such jobs at once; each leases its own GPU
    log:
        "results/{name}/logs/finetune_lora.log",
    benchmark:
        "results/{name}/benchmarks/finetune_lora.tsv"
    shell:
        "rapidin --threads {threads} finetune-lora --model {input.model:q} --train {input.train:q}"
        " --out {output.adapter:q} --template {params.template:q} --max-length {params.max_length:q}"
        " --on-long {params.on_long:q} --fields {params.fields:q} --rank {params.rank:q} --alpha {params.alpha:q}"
        " --target-modules {params.target_modules:q} --epochs {params.epochs:q} --batch-size {params.batch_size:q}"
        " --lr {params.lr:q} --seed {params.seed:q} 2>&1 | tee {log:q}"
