# The HTML report, readable without rapidin.


rule write_report:
    input:
        topk="results/{name}/influence/topk.jsonl",
        metrics="results/{name}/metrics.json",
    output:
        html=report("results/{name}/report/index.html", caption="../report/index.rst", category="Report"),
    params:
        settings=run_settings(),
        top_n=config["report"]["top_n"],
    log:
        "results/{name}/logs/write_report.log",
    shell:
        "{RAPIDIN} report --topk {input.topk} --metrics {input.metrics} --settings {params.settings:q}"
        " --top-n {params.top_n} --out {output.html} 2>&1 | tee {log}"
