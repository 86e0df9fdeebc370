# Tokenize the training set and the queries with the model's tokenizer and prompt template.


rule tokenize_dataset:
    input:
        data=data_path,
        model=model_dir(),
    output:
        tokens=directory("results/{name}/tokens/{split}.zarr"),
    params:
        template=config["data"]["template"],
        max_length=config["data"]["max_length"],
        on_long=config["data"]["on_long"],
    log:
        "results/{name}/logs/tokenize_dataset/{split}.log",
    shell:
        "rapidin tokenize --data {input.data} --model {input.model} --out {output.tokens}"
        " --template {params.template} --max-length {params.max_length} --on-long {params.on_long} 2>&1 | tee {log}"
