# Backdoor-retrieval metrics (when the data carries "poisoned" and "attacked" labels).


rule evaluate_backdoor:
    input:
        unpack(model_inputs),
        scores="results/{name}/influence/scores.zarr/zarr.json",
        train=config["data"]["train"],
        queries=config["data"]["queries"],
    output:
        metrics=report("results/{name}/metrics.json", caption="../report/metrics.rst", category="Evaluation"),
    params:
        model=lambda wildcards, input: input.model,  # the attack success rate is measured with it
        adapter=adapter_input,
        template=config["data"]["template"],
        fields=FIELDS,
    log:
        "results/{name}/logs/evaluate_backdoor.log",
    shell:
        "rapidin evaluate --scores {input.scores:q} --train {input.train:q} --queries {input.queries:q}"
        " --out {output.metrics:q} --model {params.model:q} --adapter {params.adapter:q} --template {params.template:q}"
        " --fields {params.fields:q}"
        " 2>&1 | tee {log:q}"
