# rapidin: which training examples made this LLM say that? (RapidIn, Lin et al., ACL 2024)
# Table of contents only: the steps live in workflow/rules/, the algorithms in rapidin/.

from snakemake.utils import min_version, validate

from rapidin.config import check_schema, coerce_config

min_version("9.0")


envvars:
    "PATH",  # rules find `rapidin` on it (workflow/rules/common.smk)


configfile: "config/config.yaml"


coerce_config(config, "workflow/schemas/config.schema.yaml")  # --config values arrive as strings
check_schema(config, "workflow/schemas/config.schema.yaml")  # one line naming the key, not a schema dump


validate(config, "workflow/schemas/config.schema.yaml", set_default=True)


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/smollm2.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/tokenize.smk"
include: "workflow/rules/cache.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tokenwise.smk"
include: "workflow/rules/experiment.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        final_outputs(),
