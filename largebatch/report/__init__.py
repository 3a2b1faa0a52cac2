"""Markdown reports and PNG plots of a run or a sweep: ``write_report(run_dir)``."""

from .markdown import write_report

__all__ = ["write_report"]
