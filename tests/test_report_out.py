"""`largebatch report` on a run directory it cannot write to: one line, or the report goes to --out."""

from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path

import pytest
from test_reports import fake_run

from largebatch.cli import main


def a_sweep(root: Path) -> Path:
    fake_run(root / "runs" / "sgd-b128-s0", "sgd", 128, [0.5, 0.8], [2.3, 1.0, 0.5])
    fake_run(root / "runs" / "lars-b1024-s0", "lars", 1024, [0.4, 0.7], [2.3, 1.2, 0.9])
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def read_only(monkeypatch):
    """Make writes under a directory fail with EACCES, as on a read-only mount (root ignores chmod)."""
    blocked: list[Path] = []
    real_open = builtins.open

    def guarded(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            path = Path(file).absolute()
            if any(path == b or b in path.parents for b in blocked):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)
    return blocked


def test_report_on_a_read_only_run_directory_says_so_in_one_line(tmp_path, capsys, read_only):
    root = a_sweep(tmp_path / "sweep")
    before = snapshot(root)
    read_only.append(root.absolute())
    assert main(["report", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"cannot write the report into {root}: Permission denied; pass --out DIR" in err
    assert snapshot(root) == before


def test_report_writes_to_out_and_leaves_the_run_directory_alone(tmp_path, capsys, read_only):
    root = a_sweep(tmp_path / "sweep")
    before = snapshot(root)
    read_only.append(root.absolute())
    out = tmp_path / "elsewhere" / "report"
    assert main(["report", str(root), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {out / 'report.md'}"
    text = (out / "report.md").read_text()
    assert "| lars |" in text and "(accuracy-b1024.png)" in text and (out / "accuracy-b1024.png").is_file()
    assert snapshot(root) == before


def test_an_out_that_cannot_be_written_is_one_line_too(tmp_path, capsys):
    root = a_sweep(tmp_path / "sweep")
    (tmp_path / "a-file").write_text("")
    assert main(["report", str(root), "--out", str(tmp_path / "a-file" / "report")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write the report into" in err and "--out DIR" not in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a directory whatever its mode")
def test_report_on_a_chmod_read_only_directory(tmp_path, capsys):
    root = a_sweep(tmp_path / "sweep")
    root.chmod(0o555)
    try:
        assert main(["report", str(root)]) == 2
        assert "cannot write the report into" in capsys.readouterr().err
    finally:
        root.chmod(0o755)
