"""The runs of each phase, as training configurations, and the list of phases a study has.

Layout under the study's run directory (not committed: checkpoints)::

    RUN_DIR/<model>/plateau/sgd-e<E>-s<seed>/   the plateau phase
    RUN_DIR/<model>/            a sweep directory (largebatch.train.sweep): tune/, runs/, sweep.json
    RUN_DIR/<model>/tune-seeds/<family>-lr<rate>-s<seed>/
    RUN_DIR/<model>/ablation/runs/<method>-w<mode>-b<batch>-s<seed>/
    RUN_DIR/<model>/sensitivity/runs/<method>-b<batch>-s<seed>/
    RUN_DIR/<model>/noise-scale/sgd-b<base>-s<seed>/
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..records import BASELINE_METHOD, SUMMARY, read_json
from ..train.config import TrainConfig
from ..train.methods import get_method
from ..train.runner import load_data
from ..train.sweep import TUNED_FILE, SweepSpec, is_finished
from .protocol import choose_epochs, family_representatives, min_epochs_for_updates, near_best_rates, next_rate, same_run_in_sweep
from .spec import ModelBudget, StudySpec

TUNE_SEEDS, SENSITIVITY, NOISE_SCALE = "tune-seeds", "sensitivity", "noise-scale"


def template(spec: StudySpec, model: ModelBudget, epochs: int | None = None) -> TrainConfig:
    epochs = epochs or model.epochs or min(model.epoch_candidates)
    fields = dict(
        model=model.name, micro_batch=spec.micro_batch, epochs=epochs, base_batch=spec.base_batch,
        dataset=spec.dataset, data_dir=spec.data_dir, train_limit=spec.train_limit, test_limit=spec.test_limit,
        val_size=spec.val_size, split_seed=spec.split_seed, layer_every=spec.layer_every, progress=spec.progress,
        precision=spec.precision, device=spec.device, threads=spec.threads, clock_cap=spec.adascale_cap,
    )
    if spec.warmup_fraction is not None:
        fields["warmup_fraction"] = spec.warmup_fraction
    return TrainConfig(**fields)


def train_size(spec: StudySpec, model: ModelBudget) -> int:
    return len(load_data(template(spec, model, 1)).train)


def model_min_epochs(spec: StudySpec, model: ModelBudget) -> int:
    """The budget rule's part (b): the fewest epochs giving the model's largest batch ``min_updates`` updates."""
    return min_epochs_for_updates(train_size(spec, model), max(spec.batches_of(model)), spec.min_updates)


def plateau_config(spec: StudySpec, model: ModelBudget, epochs: int, seed: int) -> TrainConfig:
    config = template(spec, model, epochs)
    return dataclasses.replace(
        config, method=BASELINE_METHOD, batch=spec.base_batch, seed=seed, micro_batch=min(spec.micro_batch,
                                                                                            spec.base_batch),
        lr=spec.plateau_lr, resume=True,
        run_dir=str(Path(spec.run_dir) / model.name / "plateau" / f"{BASELINE_METHOD}-e{epochs}-s{seed}"))


def plateau_accuracies(spec: StudySpec, model: ModelBudget) -> dict[int, list[float]]:
    """Epochs -> the seeds' final accuracies (the rule's metric) of the finished plateau runs, every seed done."""
    key = "final_val_accuracy" if spec.plateau_metric == "val" else "final_test_accuracy"
    out = {}
    for epochs in sorted({e for c in model.epoch_candidates for e in (c, 2 * c)}):
        values = []
        for seed in spec.seeds_of(model):
            path = Path(plateau_config(spec, model, epochs, seed).run_dir)
            if not is_finished(path):
                break
            values.append(read_json(path / SUMMARY)[key])
        else:
            out[epochs] = values
    return out


def plateau_decision(spec: StudySpec, model: ModelBudget) -> dict:
    """The budget rule applied to the finished plateau runs (``epochs`` None while runs are missing)."""
    decision = choose_epochs(model.epoch_candidates, plateau_accuracies(spec, model), spec.plateau_tolerance,
                             model_min_epochs(spec, model))
    decision.update(metric=spec.plateau_metric, tolerance=spec.plateau_tolerance, lr=spec.plateau_lr,
                    candidates=sorted(model.epoch_candidates), min_updates=spec.min_updates,
                    largest_batch=max(spec.batches_of(model)))
    return decision


def epochs_of(spec: StudySpec, model: ModelBudget) -> int | None:
    """The model's epoch budget: given, or chosen by the budget rule (None: the plateau phase is not done)."""
    if model.epochs is not None:
        return model.epochs
    return plateau_decision(spec, model)["epochs"]


def planned_epochs(spec: StudySpec, model: ModelBudget) -> int:
    """The budget if the first eligible candidate passes the rule (what the estimate assumes)."""
    if model.epochs is not None:
        return model.epochs
    return epochs_of(spec, model) or min(e for e in model.epoch_candidates if e >= model_min_epochs(spec, model))


def sweep_spec(spec: StudySpec, model: ModelBudget, epochs: int | None = None) -> SweepSpec:
    config = template(spec, model, epochs)
    legacy = model.epoch_candidates is None and not spec.tune_extend and not spec.tune_grids
    return SweepSpec(
        methods=list(spec.methods), batches=spec.batches_of(model), seeds=spec.seeds_of(model),
        run_dir=str(Path(spec.run_dir) / model.name), template=config,
        # the first study tunes inside the sweep, on one grid; otherwise the study tunes (extending grids)
        tune_grid=list(spec.tune_grid) if legacy else [],
        evals_per_epoch=spec.evals_per_epoch, train_size=len(load_data(config).train),
    )


def tune_config(sweep: SweepSpec, spec: StudySpec, family: str, method: str, lr: float) -> TrainConfig:
    return dataclasses.replace(sweep.config(method, spec.base_batch, sweep.seeds[0], lr=lr),
                               run_dir=str(Path(sweep.run_dir) / "tune" / f"{family}-lr{lr:g}"))


def tune_seed_config(sweep: SweepSpec, base_batch: int, family: str, method: str, lr: float,
                     seed: int) -> TrainConfig:
    return dataclasses.replace(sweep.config(method, base_batch, seed, lr=lr),
                               run_dir=str(Path(sweep.run_dir) / TUNE_SEEDS / f"{family}-lr{lr:g}-s{seed}"))


def tune_seed_configs(sweep: SweepSpec, base_batch: int, tuned: dict, representatives: dict[str, str],
                      tune_seeds: int, within: float) -> list[TrainConfig]:
    """The runs the phase asks for, from the first seed's grids in ``tuned`` (family -> its entry)."""
    seeds = sweep.seeds[1:tune_seeds]
    return [tune_seed_config(sweep, base_batch, family, representatives[family], lr, seed)
            for family, entry in tuned.items() if family in representatives
            for lr in near_best_rates(entry["grid"], within) for seed in seeds]


def sensitivity_config(sweep: SweepSpec, method: str, batch: int, seed: int) -> TrainConfig:
    """The main sweep's run of (method, batch, seed) from its family's next lower rate."""
    config = sweep.config(method, batch, seed)
    return dataclasses.replace(config, lr=next_rate(config.base_lr(), up=False),
                               run_dir=str(Path(sweep.run_dir) / SENSITIVITY / "runs" / Path(config.run_dir).name))


def sensitivity_configs(sweep: SweepSpec, seeds: list[int]) -> list[TrainConfig]:
    return [sensitivity_config(sweep, method, batch, seed)
            for seed in seeds for batch in sweep.batches for method in sweep.methods]


def noise_scale_config(sweep: SweepSpec, base_batch: int) -> TrainConfig:
    config = sweep.config(BASELINE_METHOD, base_batch, sweep.seeds[0])
    name = Path(config.run_dir).name
    return dataclasses.replace(config, noise_scale=True, run_dir=str(Path(sweep.run_dir) / NOISE_SCALE / name))


@dataclass(frozen=True)
class AblationRun:
    method: str
    mode: str
    batch: int
    seed: int
    same_as: str | None  # the main-sweep method whose run this is, or None: trained here


def ablation_runs(spec: StudySpec, model: ModelBudget | None = None) -> list[AblationRun]:
    model = model or spec.models[0]
    return [
        AblationRun(method, mode, batch, seed, same_run_in_sweep(method, mode, spec.methods))
        for seed in spec.ablation_seeds_of(model) for batch in spec.ablation_batch_sizes(model)
        for method in spec.ablation_methods for mode in spec.ablation_modes
    ]


def ablation_config(sweep: SweepSpec, run: AblationRun) -> TrainConfig:
    if run.same_as is not None:
        return sweep.config(run.same_as, run.batch, run.seed)
    config = sweep.config(run.method, run.batch, run.seed)
    run_dir = Path(sweep.run_dir) / "ablation" / "runs" / f"{run.method}-w{run.mode}-b{run.batch}-s{run.seed}"
    return dataclasses.replace(config, warmup=run.mode, run_dir=str(run_dir))


@dataclass
class Phase:
    model: str
    name: str  # "plateau", "tune", "sweep" or "ablation"
    configs: list[TrainConfig]
    note: str = ""


def phases(spec: StudySpec) -> list[Phase]:
    """Every phase's runs. A model whose budget the plateau phase has not chosen yet is planned at its first
    eligible candidate (the tuning phase at the initial grids: an extension adds runs)."""
    out = []
    for model in spec.models:
        epochs = planned_epochs(spec, model)
        if model.epoch_candidates is not None:
            decided = epochs_of(spec, model) is not None
            plateau = [plateau_config(spec, model, e, s) for e in (epochs, 2 * epochs) for s in spec.seeds_of(model)]
            note = "" if decided else f"E = {epochs} if it passes the rule"
            out.append(Phase(model.name, "plateau", plateau, note))
        sweep = sweep_spec(spec, model, epochs)
        tune_runs = [tune_config(sweep, spec, get_method(method).family, method, lr)
                     for method in family_representatives(spec.methods)
                     for lr in spec.grid_of(get_method(method).family)]
        tuned = _tuned_so_far(spec, model)
        sweep.lrs.update({family: entry["lr"] for family, entry in tuned.items()})
        main = [sweep.config(m, b, s) for m, b, s in sweep.runs()]
        ablation = [ablation_config(sweep, r) for r in ablation_runs(spec, model) if r.same_as is None]
        out += [Phase(model.name, "tune", tune_runs)]
        if spec.tune_seeds > 1:
            out.append(Phase(model.name, TUNE_SEEDS, tune_seed_configs(
                sweep, spec.base_batch, tuned, _representatives(spec), spec.tune_seeds, spec.tune_within),
                "" if tuned else "the near-best rates once tuned"))
        out += [Phase(model.name, "sweep", main), Phase(model.name, "ablation", ablation)]
        if spec.sensitivity_seeds_of(model):
            out.append(Phase(model.name, SENSITIVITY, sensitivity_configs(sweep, spec.sensitivity_seeds_of(model))))
        if spec.noise_scale:
            out.append(Phase(model.name, NOISE_SCALE, [noise_scale_config(sweep, spec.base_batch)]))
    return out


def _tuned_so_far(spec: StudySpec, model: ModelBudget) -> dict:
    path = Path(spec.run_dir) / model.name / TUNED_FILE
    return read_json(path) if path.exists() else {}


def _representatives(spec: StudySpec) -> dict[str, str]:
    """Family -> the method that tunes its rate."""
    return {get_method(m).family: m for m in family_representatives(spec.methods)}
