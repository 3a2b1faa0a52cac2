"""The papers' study, scaled to a small machine: one specification, one command (docs/study.md).

- :mod:`.spec`: what a study runs (``StudySpec``; presets are TOML files in ``presets/``);
- :mod:`.protocol`: its rules as pure functions (epoch budget, tuning, one-SE rule, ablation equals);
- :mod:`.phases`: each phase's runs as training configurations;
- :mod:`.run`: running every phase, resumably (``run_study``), with :mod:`.committer` for ``--commit``;
- :mod:`.records`: summaries.json, written from the run directories and read back into them;
- :mod:`.estimate`: the wall-time estimate.

The page is :mod:`largebatch.report.study`'s, written from summaries.json alone.
"""

from .estimate import estimate
from .protocol import choose_epochs, min_epochs_for_updates, near_best_rates, next_rate, one_standard_error, tune_with_extension
from .records import SUMMARIES, collect, restore_committed
from .run import run_study
from .spec import ModelBudget, StudySpec, presets

__all__ = [
    "SUMMARIES",
    "ModelBudget",
    "StudySpec",
    "choose_epochs",
    "collect",
    "estimate",
    "min_epochs_for_updates",
    "near_best_rates",
    "next_rate",
    "one_standard_error",
    "presets",
    "restore_committed",
    "run_study",
    "tune_with_extension",
]
