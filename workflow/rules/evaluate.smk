# Backdoor-retrieval metrics (when the data carries "poisoned" and "attacked" labels).


rule evaluate_backdoor:
    input:
        unpack(model_inputs),
        scores="results/{name}/influence/scores.zarr",
        train=config["data"]["train"],
        queries=config["data"]["queries"],
    output:
        metrics=report("results/{name}/metrics.json", caption="../report/metrics.rst", category="Evaluation"),
    params:
        model=model_flags(),
        template=config["data"]["template"],
    log:
        "results/{name}/logs/evaluate_backdoor.log",
    shell:
        "rapidin evaluate --scores {input.scores} --train {input.train} --queries {input.queries}"
        " --out {output.metrics} {params.model} --template {params.template} 2>&1 | tee {log}"
