"""A study run record as summaries.json holds it, for the page and study tests."""

from __future__ import annotations

import json
from pathlib import Path


def run_record(method, batch, seed, final, hits, phase="sweep", warmup="default", **extra):
    """A sweep record whose test accuracy is checked at steps 1..len(hits)."""
    steps = list(range(1, len(hits) + 1))
    return {"model": "mlp", "phase": phase, "method": method, "warmup": warmup, "batch": batch, "seed": seed,
            "base_lr": 0.1, "epochs": 2, "steps": len(hits), "steps_per_epoch": max(1, len(hits) // 2),
            "train_seconds": float(len(hits)), "train_cpu_seconds": 2.0 * len(hits),
            "final_test_accuracy": final, "final_val_accuracy": final, "warmup_steps": 0, "run": f"{method}-{batch}",
            "evals": {"step": steps, "epoch": [s / max(1, len(hits) // 2) for s in steps],
                      "seconds": [float(s) for s in steps], "cpu": [2.0 * s for s in steps], "accuracy": hits,
                      "loss": [None] * len(hits)}, **extra}


def tiny_study(root, models: list[dict], **keys) -> Path:
    """Write a study specification for a slice of Fashion-MNIST under ``root`` (runs, results, page) with
    ``keys`` over the shared small settings; returns the TOML file's path."""
    import json
    from pathlib import Path

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        return json.dumps(v)

    settings = {"train_limit": 512, "test_limit": 200, "val_size": 200, "early_epochs": 1, "layer_every": 1,
                "run_dir": f"{root}/runs", "artifacts": f"{root}/results", "out": f"{root}/docs/results.md",
                "benchmarks": str(Path(__file__).resolve().parents[1] / "benchmarks" / "results"), **keys}
    lines = [f"{k} = {value(v)}" for k, v in settings.items()]
    for model in models:
        lines += ["", "[[models]]", *(f"{k} = {value(v)}" for k, v in model.items())]
    path = Path(root) / "tiny.toml"
    path.write_text("\n".join(lines) + "\n")
    return path
