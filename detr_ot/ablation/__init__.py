"""Ablations: a grid of training variants x seeds, each an ordinary ``tools/train.py`` run, then their curves and
table. :mod:`~detr_ot.ablation.plan` builds the jobs and their commands, :mod:`~detr_ot.ablation.scheduler`
runs them as subprocesses (resuming interrupted ones), :mod:`~detr_ot.ablation.results` plots the finished
runs, and :mod:`~detr_ot.ablation.cli` is the command line of ``tools/ablate.py``."""

from detr_ot.ablation.plan import (
    Job,
    Launch,
    build_command,
    expand,
    make_slots,
    parse_extra,
    parse_grid,
    parse_variants,
    split_values,
    variant_name,
)
from detr_ot.ablation.results import plot_results
from detr_ot.ablation.scheduler import Scheduler

__all__ = [
    "Job",
    "Launch",
    "Scheduler",
    "build_command",
    "expand",
    "make_slots",
    "parse_extra",
    "parse_grid",
    "parse_variants",
    "plot_results",
    "split_values",
    "variant_name",
]
