"""The strategy benchmarks run and write their rows (one timed step; the timings themselves are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": ""}, cwd=BENCHMARKS)


@pytest.mark.slow
def test_grad_stats_times_every_strategy_and_the_layer_breakdown(tmp_path):
    out = tmp_path / "grad_stats.json"
    done = run("grad_stats.py", "--models", "lenet5-bn", "--repeats", "1", "--strategies", "--output", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    norms, breakdown = json.loads(out.read_text())["rows"]
    assert set(norms["ratios"]) >= {"ghost/plain", "measure/plain", "force:ghost/plain", "force:bmm/plain",
                                    "force:conv-backward/plain"}
    assert norms["strategies"]["force:bmm"]["0.weight"].startswith("bmm (forced")
    assert "(measured on" in norms["strategies"]["measure"]["4.weight"]
    layer = breakdown["layers"]["0"]
    assert set(layer["median_ms"]) == {"plain_weight_grad", "ghost", "bmm", "conv-backward"}
    assert layer["rule"].startswith("conv-backward (rule:")


@pytest.mark.slow
def test_method_overhead_adds_clars_per_strategy(tmp_path):
    out = tmp_path / "method_overhead.json"
    done = run("method_overhead.py", "--models", "lenet5-bn", "--micro-batches", "1", "--rounds", "1", "--quick",
               "--clars-strategies", "bmm", "--output", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    ratios = json.loads(out.read_text())["rows"][0]["ratios_of_medians"]
    assert {"clars/sgd", "clars:bmm/lars", "clars:bmm/sgd"} <= set(ratios)
    bad = run("method_overhead.py", "--clars-strategies", "fastest", "--output", str(tmp_path / "x.json"))
    assert bad.returncode == 2 and "fastest" in bad.stderr
