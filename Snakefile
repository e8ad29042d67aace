"""ASFT workflow: config matrix -> download -> train -> merge -> evaluate -> aggregate.

Run `snakemake` for the embedded demo (config/config.yaml), or `snakemake --configfile config/paper.yaml
--profile profiles/slurm` on a cluster. Every rule calls one `asft` CLI command; the logic lives in the package.
"""

# The embedded demo is the default; `--configfile other.yaml` replaces it rather than merging into it.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/aggregate.smk"


rule all:
    default_target: True
    input:
        all_targets(),
