# The HTML report (with its plots), readable without rapidin.


rule write_report:
    input:
        unpack(report_inputs),
    output:
        html=report("results/{name}/report/index.html", caption="../report/index.rst", category="Report"),
        plots=report(
            directory("results/{name}/report/plots"),
            patterns=["{plot}.png"],
            caption="../report/plots.rst",
            category="Report",
        ),
    params:
        settings=run_settings(),
        top_n=config["report"]["top_n"],
        tokens=tokens_flag,
    log:
        "results/{name}/logs/write_report.log",
    shell:
        "rapidin report --topk {input.topk} --scores {input.scores} --train {input.train} --metrics {input.metrics}"
        " {params.tokens} --settings {params.settings:q} --top-n {params.top_n} --out {output.html}"
        " --plots-dir {output.plots} 2>&1 | tee {log}"
