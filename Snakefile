# dmr: Dynamic Mixed-Precision Routing, as a Snakemake workflow.
# Layout of results/ is documented in docs/results.md.
from snakemake.utils import min_version

min_version("9.0")


# The embedded default, only when no --configfile is given: a config named on the command line stands
# alone (nothing of config/config.yaml reaches it). An overlay names its base before it:
#   snakemake --configfile config/config.yaml config/agents.yaml
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
# A rule is defined before any `use rule` of it: evaluate.smk (rollout) before agent.smk (select_rollout)
# and ablation.smk (rollout_variant); route.smk (klst, calibrate) before grpo.smk and ablation.smk.
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/agent.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/route.smk"
include: "workflow/rules/grpo.smk"
include: "workflow/rules/ablation.smk"


onstart:
    on_start()


rule all:
    default_target: True
    input:
        all_targets(),
