# The HTML report: one self-contained file (plots inlined), readable without rapidin.


rule write_report:
    input:
        unpack(report_inputs),
    output:
        html=report("results/{name}/report/index.html", caption="../report/index.rst", category="Report"),
    params:
        run_settings=run_settings(),
        top_n=config["report"]["top_n"],
        tokens=tokens_input,
        fields=FIELDS,
    log:
        "results/{name}/logs/write_report.log",
    shell:
        "rapidin report --topk {input.topk:q} --scores {input.scores:q} --train {input.train:q}"
        " --metrics {input.metrics:q} --tokens {params.tokens:q} --run-settings {params.run_settings:q}"
        " --top-n {params.top_n:q} --fields {params.fields:q} --out {output.html:q} 2>&1 | tee {log:q}"
