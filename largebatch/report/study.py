"""The study's results page (docs/results.md), written from its summaries.json alone.

:mod:`.study_view` reads the summaries, :mod:`.verdicts` judges each paper's
claims, :mod:`.study_page` and :mod:`.robustness` write the sections. This
module is the entry point: the page, and the README's headline table.
"""

from __future__ import annotations

from pathlib import Path

from ..records import read_json
from .study_page import headline, page
from .study_view import Study


HEADLINE = "headline.md"  # beside summaries.json: the README's table, as of the page last written


def write_study_report(summaries: str | Path, out: str | Path) -> Path:
    """Write the Markdown page to ``out``, and its PNGs and the README's headline table (``headline.md``)
    beside ``summaries``; returns the page's path.

    The README quotes the headline of the page last written, not of the summaries as they grow: a study
    commits its summaries while it runs, and a table of half-finished reruns is not a verdict."""
    summaries, out = Path(summaries), Path(out)
    if not summaries.exists():
        raise ValueError(f"{summaries} does not exist: run the study first")
    data = read_json(summaries)
    study = Study(data, summaries.parent, out.parent)
    lines = page(study)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    (summaries.parent / HEADLINE).write_text("\n".join(headline(study)) + "\n")
    return out


def headline_table(data: dict | str | Path, batch: int | None = None) -> str:
    """The README's headline: final test accuracy (%) of every method at ``batch`` (default: the largest
    batch every model ran), mean over seeds, one row per model with its target; Markdown."""
    if not isinstance(data, dict):
        data = read_json(Path(data))
    return "\n".join(headline(Study(data, Path("."), Path(".")), batch))
