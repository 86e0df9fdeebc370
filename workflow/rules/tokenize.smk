# Tokenize the training set and the queries with the model's tokenizer and prompt template.


rule tokenize_dataset:
    input:
        data=data_path,
        model=model_dir(),
    output:
        tokens="results/{name}/tokens/{split}.zarr/zarr.json",
    params:
        template=config["data"]["template"],
        max_length=config["data"]["max_length"],
        on_long=config["data"]["on_long"],
        fields=FIELDS,
        queries=lambda wildcards: wildcards.split == "queries",
    log:
        "results/{name}/logs/tokenize_dataset/{split}.log",
    shell:
        "rapidin tokenize --data {input.data:q} --model {input.model:q} --out {output.tokens:q}"
        " --template {params.template:q} --max-length {params.max_length:q} --on-long {params.on_long:q}"
        " --fields {params.fields:q} --queries {params.queries:q}"
        " 2>&1 | tee {log:q}"
