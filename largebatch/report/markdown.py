"""report.md for a sweep directory (or a single run directory), with its PNG plots.

The results table follows the LENA paper's Table 1: rows are methods, columns
batch sizes, and each cell reads "final test accuracy / iterations to target /
time to target" (mean ± standard deviation over seeds), or "never" where no
evaluation reached the target.
"""

from __future__ import annotations

from pathlib import Path

from ..records import BASELINE_METHOD, CONFIG, LAYER_DEFINITION, SWEEP_FILE, read_json
from . import plots
from .results import RunResult, load_runs, table, targets

REPORT = "report.md"


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.md`` and the PNGs into ``out`` (default ``run_dir``); returns the report's path.

    The run directory is only read: a read-only one (an archive, another user's) reports into ``out``.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    runs = load_runs(root)
    if not runs:
        raise ValueError(f"{root} holds no finished run (no summary.json under it or under {root}/runs/)")
    target = Path(out) if out is not None else root
    _check_writable(target, given=out is not None)
    sweep = read_json(root / SWEEP_FILE) if (root / SWEEP_FILE).exists() else _inferred_sweep(runs, root)
    target_of = targets(runs, sweep["base_batch"], sweep.get("baseline_method", BASELINE_METHOD))
    lines = _header(sweep, runs, target_of)
    lines += _results_table(runs, target_of, sweep)
    path = target / REPORT
    try:
        lines += _plots(runs, target_of, target)
        path.write_text("\n".join(lines) + "\n")
    except OSError as e:  # the disk filled up, or the directory changed under us
        raise ValueError(f"cannot write the report into {target}: {e.strerror or e}") from None
    return path


def _check_writable(directory: Path, given: bool) -> None:
    """Make ``directory`` and write a probe there first, so that a read-only one fails in one line, before the
    plots."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".report-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        hint = "" if given else "; pass --out DIR to write the report elsewhere"
        raise ValueError(f"cannot write the report into {directory}: {e.strerror or e}{hint}") from None


def _inferred_sweep(runs: list[RunResult], root: Path) -> dict:
    config = read_json(runs[0].run_dir / CONFIG)["config"] if (runs[0].run_dir / CONFIG).exists() else {}
    return {
        "methods": sorted({r.method for r in runs}), "batches": sorted({r.batch for r in runs}),
        "seeds": sorted({r.seed for r in runs}), "base_batch": config.get("base_batch", 128),
        "template": config, "protocol": {},
    }


def _header(sweep: dict, runs: list[RunResult], target_of: dict[int, float]) -> list[str]:
    template, protocol = sweep.get("template", {}), sweep.get("protocol", {})
    epochs = template.get("epochs", "?")
    lines = [
        f"# Large-batch training: {template.get('model', '?')} on {template.get('dataset', '?')}, "
        f"{epochs} epoch{'' if epochs == 1 else 's'}",
        "",
        "## Protocol",
        "",
        f"- Base batch {sweep['base_batch']}; methods {', '.join(sweep['methods'])}; "
        f"batches {', '.join(map(str, sweep['batches']))}; seeds {', '.join(map(str, sweep['seeds']))}.",
    ]
    for family, rate in protocol.get("base_rates", {}).items():
        lines.append(f"- Base rate of the {family} family: {rate['lr']:g} ({rate['how']}); every method of a "
                     "family starts from it and scales it by its own rule.")
    lines += [
        "- Target: " + protocol.get("target", f"per seed, the final test accuracy of {BASELINE_METHOD} at the "
                                    f"base batch {sweep['base_batch']}") + ".",
        "- Accuracy checked " + protocol.get("accuracy_checked", "on the test set at every evaluation") + ".",
        "- Time: " + protocol.get("time", "training wall-clock seconds, evaluation excluded") + ".",
        "- The test set is never used for tuning; base rates are chosen on the validation split.",
        f"- A layer is {LAYER_DEFINITION}.",
    ]
    loads = [r.load_average[0] for r in runs if r.load_average]
    if loads:
        lines.append(f"- Machine load (1-minute load average as each run ended): {min(loads):.1f} to "
                     f"{max(loads):.1f}; times are comparable only between runs on an equally loaded machine "
                     "(each summary.json has its machine's load at the start and end).")
    diverged = [r for r in runs if r.diverged_at_step is not None]
    for r in diverged:
        lines.append(f"- {r.method} at batch {r.batch}, seed {r.seed}: diverged at step {r.diverged_at_step} (a "
                     "non-finite training loss); the run stopped there.")
    lines.append("")
    if target_of:
        lines.append("Targets: " + ", ".join(f"seed {s}: {100 * a:.2f}%" for s, a in sorted(target_of.items())))
    else:
        lines.append(f"No baseline ({BASELINE_METHOD} at batch {sweep['base_batch']}) finished: no targets.")
    lines.append("")
    return lines


def _results_table(runs: list[RunResult], target_of: dict[int, float], sweep: dict) -> list[str]:
    cells = table(runs, target_of)
    methods = [m for m in sweep["methods"] if any(k[0] == m for k in cells)]
    methods += sorted({m for m, _ in cells} - set(methods))
    batches = sorted({b for _, b in cells})
    lines = [
        "## Results",
        "",
        "Each cell: final test accuracy / iterations to target / time to target, mean ± standard deviation "
        "over seeds; \"never\": no evaluation reached the target.",
        "",
        "| method | " + " | ".join(f"B = {b}" for b in batches) + " |",
        "|---|" + "---|" * len(batches),
    ]
    for method in methods:
        row = [cells[(method, b)].text() if (method, b) in cells else "-" for b in batches]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    lines.append("")
    return lines


def _plots(runs: list[RunResult], target_of: dict[int, float], root: Path) -> list[str]:
    lines = ["## Plots", ""]
    mean_target = sum(target_of.values()) / len(target_of) if target_of else None
    for batch in sorted({r.batch for r in runs}):
        at_batch = [r for r in runs if r.batch == batch]
        if any(len(r.evals) > 1 for r in at_batch):
            path, notes = plots.accuracy_vs_iterations(at_batch, mean_target, batch, root / f"accuracy-b{batch}.png")
            lines += [f"![test accuracy vs iterations, batch {batch}]({path.name})", ""]
            lines += [f"Drawn on top of each other: {'; '.join(notes)} (hollow markers).", ""] if notes else []
        else:
            checks = ", ".join(f"{r.method} seed {r.seed}: {100 * r.evals[-1]['test_accuracy']:.2f}% at step "
                               f"{r.evals[-1]['step']}" for r in at_batch if r.evals)
            lines += [f"Batch {batch}: test accuracy was checked once per run ({checks}); no curve to draw "
                      "(`--eval-every k` checks it every k steps).", ""]
        loss = plots.loss_vs_iterations(at_batch, batch, root / f"loss-b{batch}.png")
        if loss is not None:
            path, notes = loss
            lines += [f"![training loss vs iterations, batch {batch}]({path.name})", ""]
            lines += [f"Drawn on top of each other: {'; '.join(notes)} (hollow markers).", ""] if notes else []
    first_seed = min(r.seed for r in runs)
    for run in (r for r in runs if r.seed == first_seed):
        name = f"{run.method}-b{run.batch}"
        rates = plots.layer_rates(run, root / f"layers-{name}.png")
        if rates is not None:
            lines += [f"![per-layer effective rates, {run.method}, batch {run.batch}]({rates.name})", ""]
        ends = plots.warmup_end_points(run, root / f"warmup-{name}.png")
        if ends is not None:
            lines += [f"![per-layer warm-up end points, {run.method}, batch {run.batch}]({ends.name})", ""]
            missing = [layer for layer, end in plots.warmup_ends(run).items() if end is None]
            if missing:
                lines += [f"Warm-up not reached by the last step ({run.steps}) in {run.method}, batch {run.batch}: "
                          f"{', '.join(missing)}.", ""]
    return lines
