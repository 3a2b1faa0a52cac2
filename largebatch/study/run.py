"""Running a study: every phase of every model, skipping finished runs, committing as it goes.

``largebatch study --preset paper-v2`` (or ``--spec study.toml``) runs, per model:

0. the plateau phase (when the model gives ``epoch_candidates`` instead of
   ``epochs``): momentum SGD at the base batch with E and 2E epochs for every
   seed, for the smallest candidate E that gives the largest batch at least
   ``min_updates`` updates, then the next candidate until one passes
   |acc(2E) - acc(E)| <= ``plateau_tolerance`` (mean over seeds); that E is the
   model's epoch budget for every later phase (:func:`.protocol.choose_epochs`);
1. base-rate tuning: for every method family, its representative method at the
   base batch, first seed, over the family's grid; the best final validation
   accuracy wins, and with ``tune_extend`` > 0 a grid whose best rate is at an
   end is extended by half-decade steps until the best is inside
   (:func:`.protocol.tune_with_extension`); with ``tune_seeds`` > 1, the
   near-best rates on the next seeds and the one-standard-error rule
   (:func:`.protocol.one_standard_error`);
2. with ``noise_scale``, the base-batch SGD run recording the gradient noise scale;
3. the main sweep: every (method, batch, seed) from the tuned base rates, each
   method carrying its rate to the large batch by its own rule; no tuning at
   large batches;
4. the warm-up ablation (LENA paper, Table 2): every ablation method with each
   warm-up mode (none, fixed, state-aware) at the two largest batches. A mode
   that is the method's own default is the main sweep's run, as is a mode that
   turns one method into another of the sweep (LSW without warm-up is SGD);
5. with ``sensitivity_seeds``, the main sweep from each family's next lower rate;
6. the summaries of every run in one small JSON file (:mod:`.records`); the
   command line then writes the results page from that file alone
   (:mod:`largebatch.report.study`).

Every run is skipped when its summary.json exists and resumed from its
checkpoint otherwise; ``summaries.json`` is rewritten after every finished run
and, with ``--commit``, committed after the first run that finishes
``commit_every_minutes`` after the previous commit and at the end of every phase.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

from ..records import SUMMARY, read_json, write_json
from ..train.config import TrainConfig
from ..train.methods import get_method
from ..train.runner import Interrupted, train
from ..train.sweep import TUNED_FILE, Progress, SweepSpec, finished_differently, is_finished, outcome, run_sweep
from .committer import Committer
from .phases import (NOISE_SCALE, SENSITIVITY, _representatives, ablation_config, ablation_runs, model_min_epochs,
                     noise_scale_config, phases, plateau_config, plateau_decision, sensitivity_configs, sweep_spec,
                     tune_config, tune_seed_config, tune_seed_configs)
from .protocol import ONE_SE, family_representatives, near_best_rates, one_standard_error, tune_with_extension
from .records import PLATEAU_FILE, SUPERSEDED, SUPERSEDED_NOTE, collect, restore_committed
from .spec import ModelBudget, StudySpec

# (config, label) -> the finished run's summary
TrainOne = Callable[[TrainConfig, str], dict]


def _train_logged(config: TrainConfig, label: str, progress: Progress, committer: Committer,
                  log: Callable[[str], None], k: int, n: int) -> dict | None:
    if is_finished(Path(config.run_dir)):
        log(f"{label}: finished, skipped")
        return read_json(Path(config.run_dir) / SUMMARY)
    log(f"{label}: training, run {k} of {n}{progress.eta()}")
    summary = progress.timed(train, config)
    log(f"{label}: {outcome(summary)}")
    committer.finished_run()
    return summary


def run_plateau(spec: StudySpec, model: ModelBudget, committer: Committer,
                log: Callable[[str], None] = print) -> dict:
    """Train the plateau runs the budget rule asks for, one candidate at a time; returns the decision."""
    while True:
        decision = plateau_decision(spec, model)
        if decision["pending"] is None:
            break
        epochs = decision["pending"]
        configs = [plateau_config(spec, model, epochs, s) for s in spec.seeds_of(model)]
        progress = Progress(sum(not is_finished(Path(c.run_dir)) for c in configs))
        for k, config in enumerate(configs, 1):
            _train_logged(config, f"plateau {model.name} sgd batch {spec.base_batch} {epochs} epochs seed "
                          f"{config.seed}", progress, committer, log, k, len(configs))
    root = Path(spec.run_dir) / model.name
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / PLATEAU_FILE, decision)
    checks = "; ".join(f"E = {c['epochs']}: {100 * c['accuracy']:.2f}% -> {100 * c['accuracy_2e']:.2f}% at 2E "
                       f"({'passes' if c['passes'] else 'fails'})" for c in decision["checks"])
    log(f"== {model.name}: budget rule: {checks}; E = {decision['epochs']}"
        + ("" if decision["rule_met"] else " (no candidate passed: the largest eligible one)"))
    return decision


def run_tuning(spec: StudySpec, sweep: SweepSpec, committer: Committer, log: Callable[[str], None] = print) -> dict:
    """Tune each family at the base batch on its grid, extending a grid whose best rate is at an end."""
    path = Path(sweep.run_dir) / TUNED_FILE
    tuned = read_json(path) if path.exists() else {}
    for method in family_representatives(spec.methods):
        family = get_method(method).family
        grid = spec.grid_of(family)
        entry = tuned.get(family)
        if entry and entry.get("initial_grid") == grid and entry.get("max_extend") == spec.tune_extend:
            continue
        progress = Progress(sum(not is_finished(Path(tune_config(sweep, spec, family, method, lr).run_dir))
                                for lr in grid))

        def evaluate(lr: float, method=method, family=family) -> float:
            config = tune_config(sweep, spec, family, method, lr)
            label = f"tune {method} lr {lr:g} at batch {spec.base_batch}"
            summary = _train_logged(config, label, progress, committer, log, 1, 1)
            return summary["final_val_accuracy"]  # a diverged run's: its model as the run left it

        result = tune_with_extension(grid, evaluate, spec.tune_extend)
        result["max_extend"] = spec.tune_extend
        result["how"] = (f"tuned with {method} at batch {spec.base_batch}, seed {sweep.seeds[0]}, "
                         f"{sweep.template.epochs} epochs: best validation accuracy over "
                         f"{', '.join(f'{lr:g}' for lr in result['final_grid'])}")
        tuned[family] = result
        write_json(path, tuned)
        log(f"tuned {family}: {result['lr']:g} ({'inside' if result['inside'] else 'AT AN END of'} the grid "
            f"{', '.join(f'{lr:g}' for lr in result['final_grid'])})")
    return tuned


def run_tune_seeds(sweep: SweepSpec, base_batch: int, tuned: dict, representatives: dict[str, str],
                   tune_seeds: int, within: float, train_one: TrainOne,
                   log: Callable[[str], None] = print) -> dict:
    """Train the near-best rates on the next seeds and choose each family's rate by the one-SE rule.

    Each family's entry of ``tuned`` keeps what the first seed chose as
    ``first_seed_lr`` and gets ``lr`` (the rule's choice), ``rule``,
    ``seeds``, ``seed_scores`` (rate -> the seeds' validation accuracies)
    and the rule's ``one_se`` record; tuned.json is rewritten after each family.
    """
    seeds = sweep.seeds[:tune_seeds]
    path = Path(sweep.run_dir) / TUNED_FILE
    for family, entry in tuned.items():
        if family not in representatives:
            continue
        method = representatives[family]
        scores: dict[float, list[float]] = {}
        for lr in near_best_rates(entry["grid"], within):
            scores[lr] = [entry["grid"][f"{lr:g}"]]
            for seed in seeds[1:]:
                config = tune_seed_config(sweep, base_batch, family, method, lr, seed)
                summary = train_one(config, f"tune-seeds {method} lr {lr:g} at batch {base_batch} seed {seed}")
                scores[lr].append(summary["final_val_accuracy"])
        choice = one_standard_error(scores)
        first = entry.get("first_seed_lr", entry["lr"])
        entry.update(first_seed_lr=first, lr=choice["lr"], rule=ONE_SE, seeds=seeds, within=within,
                     seed_scores={f"{lr:g}": values for lr, values in sorted(scores.items())}, one_se=choice)
        write_json(path, tuned)
        change = "unchanged" if math.isclose(choice["lr"], first) else f"was {first:g} on seed {seeds[0]}"
        log(f"tuned {family} on seeds {seeds}: {choice['lr']:g} by the one-SE rule ({change})")
    return tuned


def run_configs(configs: list[TrainConfig], phase: str, train_one: TrainOne) -> list[dict]:
    return [train_one(config, f"{phase} {config.method} lr {config.base_lr():g} batch {config.batch} "
                              f"seed {config.seed}") for config in configs]


def run_study(spec: StudySpec, log: Callable[[str], None] = print, commit: bool = False,
              write_page: Callable[[Path], Path] | None = None) -> Path:
    """Plateau, tune, sweep and ablate every model (skipping finished runs), then write summaries.json and,
    with ``write_page`` (summaries.json -> the page it wrote; the command line passes the report's), the page.
    Returns the page, or summaries.json without ``write_page``.

    Stopped by a signal or Ctrl-C, it commits what finished (with ``commit``) and says how far it got.
    """
    Path(spec.artifacts).mkdir(parents=True, exist_ok=True)
    restore_committed(spec, log)
    committer = Committer(spec, commit, log)
    try:
        for model in spec.models:
            _run_model(spec, model, committer, log)
    except (Interrupted, KeyboardInterrupt):
        committer.commit("interrupted; finished runs kept")
        log(f"stopped: {progress_note(spec)}; run the same command to resume")
        raise
    summaries = collect(spec)
    page = write_page(summaries) if write_page is not None else summaries
    committer.commit("results page" if write_page is not None else "every run")
    log(f"done: {progress_note(spec)}")
    return page


def _run_model(spec: StudySpec, model: ModelBudget, committer: Committer, log: Callable[[str], None]) -> None:
    epochs = model.epochs
    if model.epoch_candidates is not None:
        log(f"== {model.name}: plateau phase (budget rule), sgd at batch {spec.base_batch}, candidates "
            f"{model.epoch_candidates}, at least {model_min_epochs(spec, model)} epochs for {spec.min_updates} "
            f"updates at {max(spec.batches_of(model))}")
        epochs = run_plateau(spec, model, committer, log)["epochs"]
        committer.commit(f"{model.name}: plateau phase")
    sweep = sweep_spec(spec, model, epochs)
    if not sweep.tune_grid:
        log(f"== {model.name}: tuning base rates at batch {spec.base_batch}, {epochs} epochs")
        tuned = run_tuning(spec, sweep, committer, log)
        committer.commit(f"{model.name}: tuning")
        if spec.tune_seeds > 1:
            log(f"== {model.name}: near-best rates on seeds {sweep.seeds[:spec.tune_seeds]}, one-SE rule")
            configs = tune_seed_configs(sweep, spec.base_batch, tuned, _representatives(spec), spec.tune_seeds,
                                        spec.tune_within)
            tuned = run_tune_seeds(sweep, spec.base_batch, tuned, _representatives(spec), spec.tune_seeds,
                                   spec.tune_within, _trainer(configs, committer, log), log)
            committer.commit(f"{model.name}: tuning on seeds")
        sweep.lrs.update({family: entry["lr"] for family, entry in tuned.items()})
    runs = ablation_runs(spec, model)
    sensitivity = sensitivity_configs(sweep, spec.sensitivity_seeds_of(model))
    moved = set_aside_superseded([sweep.config(*run) for run in sweep.runs()]
                                 + [ablation_config(sweep, r) for r in runs if r.same_as is None] + sensitivity,
                                 Path(spec.run_dir) / model.name, log)
    if moved:
        committer.finished_run()
    if spec.noise_scale:  # one run, and the page's explanation of every fall-off: before the long phases
        log(f"== {model.name}: gradient noise scale over the base-batch run")
        noise = [noise_scale_config(sweep, spec.base_batch)]
        run_configs(noise, NOISE_SCALE, _trainer(noise, committer, log))
        committer.commit(f"{model.name}: gradient noise scale")
    log(f"== {model.name}: main sweep, {epochs} epochs, batches {sweep.batches}, seeds {sweep.seeds}")
    run_sweep(sweep, log=_then_collect(committer, log))
    committer.commit(f"{model.name}: main sweep")
    log(f"== {model.name}: warm-up ablation at batches {spec.ablation_batch_sizes(model)}")
    progress = Progress(sum(r.same_as is None and not is_finished(Path(ablation_config(sweep, r).run_dir))
                            for r in runs))
    for k, run in enumerate(runs, 1):
        label = f"ablation {run.method} --warmup {run.mode} batch {run.batch} seed {run.seed}"
        if run.same_as is not None:
            log(f"{label}: the sweep's {run.same_as} run")
            continue
        _train_logged(ablation_config(sweep, run), label, progress, committer, log, k, len(runs))
    committer.commit(f"{model.name}: warm-up ablation")
    if sensitivity:
        log(f"== {model.name}: rate sensitivity, the main sweep from each family's rate / 3, seeds "
            f"{spec.sensitivity_seeds_of(model)}")
        run_configs(sensitivity, SENSITIVITY, _trainer(sensitivity, committer, log))
        committer.commit(f"{model.name}: rate sensitivity")


def _trainer(configs: list[TrainConfig], committer: Committer, log: Callable[[str], None]):
    """A phase's train_one: trains (or skips, when finished) one of ``configs``, logging k of n with an ETA."""
    progress = Progress(sum(not is_finished(Path(c.run_dir)) for c in configs))
    counter = iter(range(1, len(configs) + 1))

    def train_one(config: TrainConfig, label: str) -> dict:
        return _train_logged(config, label, progress, committer, log, next(counter, len(configs)), len(configs))

    return train_one


def set_aside_superseded(configs: list[TrainConfig], model_root: Path, log: Callable[[str], None] = print) -> int:
    """Move finished runs that the protocol no longer asks for out of the phases' directories.

    A run directory is named by method, batch, seed and warm-up: when an
    amendment changes a family's rate (or the budget), the finished run there
    is not the run the phase wants, and would otherwise be skipped as if it
    were. It moves to ``<model>/superseded/<its path>``, with a note of why;
    ``collect`` keeps it in summaries.json as phase "superseded", so the page
    can show what the amendment replaced. Returns how many moved.
    """
    moved = 0
    for config in configs:
        changed = finished_differently(config)
        if changed is None:
            continue
        source = Path(config.run_dir)
        relative = source.relative_to(model_root)
        target = model_root / SUPERSEDED / relative
        for k in range(1, 1000):
            if not target.exists():
                break
            target = model_root / SUPERSEDED / relative.with_name(f"{relative.name}.{k}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(source), str(target))
        phase = relative.parts[0] if relative.parts[0] in ("ablation", SENSITIVITY) else "sweep"
        write_json(target / SUPERSEDED_NOTE, {"phase": phase, "because": changed})
        log(f"{source}: finished as another run ({changed}); set aside in {target}")
        moved += 1
    return moved


def _then_collect(committer: Committer, log: Callable[[str], None]) -> Callable[[str], None]:
    # run_sweep logs once per run: refresh summaries.json (and commit when due), so a stop loses nothing.
    def log_and_collect(line: str) -> None:
        log(line)
        if not line.endswith("finished, skipped") and ": training" not in line:
            committer.finished_run()

    return log_and_collect


def progress_note(spec: StudySpec) -> str:
    """How far the study got: finished runs per model and phase."""
    parts = []
    for phase in phases(spec):
        done = sum(is_finished(Path(c.run_dir)) for c in phase.configs)
        parts.append(f"{phase.model} {phase.name} {done}/{len(phase.configs)}")
    return "finished runs: " + ", ".join(parts)
