"""ASFT workflow: config matrix -> download -> train -> merge -> evaluate -> aggregate.

Run `snakemake` for the embedded demo (config/config.yaml), or `snakemake --configfile config/paper.yaml
--profile profiles/slurm` on a cluster. Every rule calls one `asft` CLI command; the logic lives in the package.
"""

# The embedded demo is the default; `--configfile other.yaml` replaces it rather than merging into it.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# Validates the config (reading the files it names relative to where snakemake was started) and plans the matrix.
include: "workflow/rules/common.smk"


# The smoke scale (asft.scale) runs the same DAG on embedded stand-ins: in its own directory, so that its
# results, downloads and Snakemake state never mix with the real ones.
if config["scale"] == "smoke":

    workdir: "smoke"


# Under --software-deployment-method apptainer, every job runs in this image (containers/; README "Environments").
if config.get("container"):

    container: config["container"]


include: "workflow/rules/fetch.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/trace.smk"
include: "workflow/rules/paper.smk"


# Under the slurm executor, refuse jobs no node could ever start before submitting any (asft.slurm_limits).
onstart:
    check_slurm_requests()


rule all:
    default_target: True
    input:
        all_targets(),


# `snakemake table1` (or table2 ... table5, fork, fig1 ... fig5, alpaca_eval): one table or figure and exactly the
# jobs it needs; `snakemake paper`: all of the paper's and the fork's. Defined only with `catalogue: paper`.
for _target in PAPER_TABLES + PAPER_FIGURES:

    rule:
        name:
            _target
        input:
            paper_outputs([_target]),


if PAPER_TABLES:

    rule paper:
        input:
            paper_outputs(PAPER_TARGETS),
