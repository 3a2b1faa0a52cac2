"""What training leaves on disk, as the reports read it: file names and JSON reading and writing.

A run directory holds metrics.jsonl (steps and evaluations), layers.jsonl
(per-layer values every few steps), config.json (what ran) and summary.json
(how it ended); a sweep directory adds sweep.json. Training writes them
(:mod:`largebatch.train`), the reports read them (:mod:`largebatch.report`);
this module is all the two share, so a report never imports the harness.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

METRICS = "metrics.jsonl"
LAYERS = "layers.jsonl"
CONFIG = "config.json"
SUMMARY = "summary.json"
SWEEP_FILE = "sweep.json"
# The method whose run at the base batch sets each seed's target accuracy (methods.md, "Measuring success").
BASELINE_METHOD = "sgd"
LAYER_DEFINITION = "one parameter tensor (keyed by its name in model.named_parameters())"


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return records
