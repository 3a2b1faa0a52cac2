"""Every ```python block of README.md and docs/guide.md runs as written, and a block that trains
lowers the loss.

The blocks of one file run in order in one fresh interpreter (a later block
may use what an earlier one defined, as a reader following the page would),
with the installed package and nothing else: no names are supplied. The
runner records every value of ``torch.nn.functional.cross_entropy`` per
block; a block that calls an optimiser's ``step()`` must end with a lower
loss than it started with (the pages train on learnable stand-in data).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from _cli_data import FASHION_MNIST, needs_fashion_mnist
from _dist import free_port

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", "docs/guide.md"]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)

# Runs the blocks it is given, each compiled under its own name, in one namespace.
RUNNER = """
import json, sys
import torch.nn.functional
blocks = json.load(sys.stdin)
namespace = {"__name__": "__main__"}
losses = []
cross_entropy = torch.nn.functional.cross_entropy
def recorded(*args, **kwargs):
    loss = cross_entropy(*args, **kwargs)
    if loss.dim() == 0:
        losses.append(loss.item())
    return loss
torch.nn.functional.cross_entropy = recorded
for name, code in blocks:
    print(f"--- {name}", flush=True)
    losses.clear()
    exec(compile(code, name, "exec"), namespace)
    print("losses " + json.dumps([name, losses]), flush=True)
"""


def falls(losses: list[float]) -> bool:
    """The mean of the last fifth of the losses is below 0.9 x the mean of the first fifth."""
    k = max(1, len(losses) // 5)
    return sum(losses[-k:]) / k < 0.9 * sum(losses[:k]) / k


def python_blocks(page: str) -> list[tuple[str, str]]:
    """(name, code) of each ```python block: name gives the page and the block's first line."""
    text = (ROOT / page).read_text()
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1) == "python":
            line = text.count("\n", 0, match.start()) + 2  # the code's first line, 1-based
            blocks.append((f"{page}:{line}", match.group(2)))
    return blocks


def test_pages_have_python_blocks():
    for page in PAGES:
        assert python_blocks(page), f"{page} has no ```python block"


@needs_fashion_mnist
@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_run_in_order(page, tmp_path):
    blocks = python_blocks(page)
    env = {**os.environ, "LARGEBATCH_DATA_DIR": FASHION_MNIST, "OMP_NUM_THREADS": "1",
           "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    done = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(blocks), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    ran = re.findall(r"^--- (\S+)$", done.stdout, re.M)
    assert done.returncode == 0, (
        f"block {ran[-1] if ran else '?'} failed\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    )
    assert ran == [name for name, _ in blocks]
    recorded = dict(json.loads(line[len("losses "):]) for line in done.stdout.splitlines()
                    if line.startswith("losses "))
    for name, code in blocks:
        if ".step()" in code and len(recorded[name]) >= 2:
            assert falls(recorded[name]), f"block {name} does not lower the loss: {recorded[name]}"


def test_falls_tells_a_falling_loss():
    assert falls([2.3, 2.0, 1.5, 1.0, 0.5]) and not falls([2.3, 2.3, 2.4, 25.0, 41.0])


def test_readme_study_table_is_the_committed_headline():
    """The README's study table is the headline the study's page last wrote (results/study-v2/headline.md,
    computed from the summaries by largebatch.report.study), not a number typed by hand."""
    table = [line for line in (ROOT / "results/study-v2/headline.md").read_text().splitlines()
             if line.startswith("|")]
    readme = (ROOT / "README.md").read_text()
    assert table and "\n".join(table) in readme


def test_the_page_writes_the_headline_of_its_summaries(tmp_path):
    from largebatch.report.study import headline_table, write_study_report

    summaries = tmp_path / "summaries.json"
    summaries.write_text((ROOT / "results/study-v2/summaries.json").read_text())
    write_study_report(summaries, tmp_path / "results.md")
    assert (tmp_path / "headline.md").read_text() == headline_table(summaries) + "\n"


def test_doc_links_point_to_files():
    """Every relative Markdown link of the front page and the docs names a file of the checkout."""
    link = re.compile(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)")
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in link.findall(page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to {target}, which is missing"
