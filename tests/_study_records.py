"""A study run record as summaries.json holds it, for the page and study tests."""

from __future__ import annotations


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
