# A real pretrained model (model.path: smollm2) and LoRA fine-tuning on data.train (model.adapter: finetune).


rule convert_smollm2:
    output:
        model=directory("results/{name}/smollm2_model"),
    log:
        "results/{name}/logs/convert_smollm2.log",
    benchmark:
        "results/{name}/benchmarks/convert_smollm2.tsv"
    shell:
        "rapidin convert-gguf --out {output.model} 2>&1 | tee {log}"


rule finetune_lora:
    input:
        model=model_dir(),
        train=config["data"]["train"],  # not the queries: adding one must not retrain the adapter
    output:
        adapter=directory("results/{name}/lora_adapter"),
    params:
        data=config["data"],
        finetune=config["finetune"],
        target_modules=" ".join(config["finetune"]["target_modules"]),
    threads: workflow.cores
    resources:
        gpu=1,  # at most --resources gpu=N such jobs at once; each leases its own GPU
    log:
        "results/{name}/logs/finetune_lora.log",
    benchmark:
        "results/{name}/benchmarks/finetune_lora.tsv"
    shell:
        "rapidin --threads {threads} finetune-lora --model {input.model} --train {input.train} --out {output.adapter}"
        " --template {params.data[template]} --max-length {params.data[max_length]} --on-long {params.data[on_long]}"
        " --rank {params.finetune[rank]} --alpha {params.finetune[alpha]} --target-modules {params.target_modules}"
        " --epochs {params.finetune[epochs]} --batch-size {params.finetune[batch_size]} --lr {params.finetune[lr]}"
        " --seed {params.finetune[seed]} 2>&1 | tee {log}"
