"""What the command line says: only what applies (resume, single-sample warnings), how to continue a sweep,
a quiet Ctrl-C at start-up, and the guide's inline commands as written (small slices of real Fashion-MNIST)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _cli_data import FASHION_MNIST, SLICE, needs_fashion_mnist

from largebatch.cli import build_parser, main
from largebatch.optim import SingleSampleWarning
from largebatch.train.faults import SIGNAL_AT_STEP_ENV

ROOT = Path(__file__).resolve().parent.parent


def sweep_args(root: Path, *extra: str) -> list[str]:
    return ["sweep", "--methods", "lsw", "--batches", "256", "--epochs", "1", "--lr", "0.05", "--run-dir", str(root),
            *SLICE, *extra]


@needs_fashion_mnist
def test_a_fresh_sweep_says_nothing_about_resuming(tmp_path, capsys):
    assert main(sweep_args(tmp_path / "sweep")) == 0
    captured = capsys.readouterr()
    assert "nothing to resume" not in captured.err + captured.out
    assert "run 2 of 2: lsw batch 256 seed 0: test accuracy" in captured.out


@needs_fashion_mnist
def test_train_resume_with_nothing_to_resume_still_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--method", "lsw", "--batch", "256", "--epochs", "1", "--max-steps", "1", "--run-dir", str(run),
            *SLICE]
    assert main(argv) == 0
    assert "nothing to resume" not in capsys.readouterr().err  # not asked for
    assert main([*argv[:-len(SLICE)], "--overwrite", *SLICE]) == 0
    capsys.readouterr()
    (run / "checkpoint.pt").unlink()
    (run / "metrics.jsonl").unlink()
    assert main([*argv, "--resume"]) == 0
    assert f"nothing to resume in {run} (no checkpoint.pt): starting at step 0" in capsys.readouterr().err


@needs_fashion_mnist
@pytest.mark.parametrize("method", ["lena", "adascale"])
def test_no_single_sample_warning_at_the_base_batch(method, tmp_path, capsys, recwarn):
    # n = B / b = 1 at the base batch: gain 1 is what the method means there, not a misconfiguration.
    assert main(["train", "--method", method, "--batch", "128", "--micro-batch", "128", "--epochs", "1",
                 "--max-steps", "3", "--run-dir", str(tmp_path / "run"), *SLICE]) == 0
    assert not [w for w in recwarn if issubclass(w.category, SingleSampleWarning)]


@needs_fashion_mnist
def test_the_single_sample_warning_stays_above_the_base_batch(tmp_path, capsys):
    with pytest.warns(SingleSampleWarning, match="n = 1"):
        assert main(["train", "--method", "lena", "--batch", "256", "--micro-batch", "256", "--epochs", "1",
                     "--max-steps", "2", "--run-dir", str(tmp_path / "run"), *SLICE]) == 0


@needs_fashion_mnist
def test_an_interrupted_sweep_says_run_the_same_command_again(tmp_path, capsys, monkeypatch):
    root = tmp_path / "sweep"
    monkeypatch.setenv(SIGNAL_AT_STEP_ENV, "2")
    assert main(sweep_args(root)) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "SIGINT at step 2: checkpoint written to" in err and "run the same command again to continue" in err
    assert "--resume" not in err  # `largebatch sweep --resume` does not exist
    monkeypatch.delenv(SIGNAL_AT_STEP_ENV)
    assert main(sweep_args(root)) == 0  # the same command again
    captured = capsys.readouterr()
    assert "resuming" in captured.err and "run 2 of 2: lsw batch 256 seed 0: test accuracy" in captured.out
    with pytest.raises(SystemExit):
        build_parser().parse_args(sweep_args(root, "--resume"))


# The console script's own start-up: `from largebatch.cli import main`, then main(). A Ctrl-C is simulated
# as it lands during the first `import torch`, wherever that import happens.
INTERRUPTED_IMPORT = """
import builtins, sys
real_import = builtins.__import__
def interrupting(name, *args, **kwargs):
    if name == "torch" and "torch" not in sys.modules:
        raise KeyboardInterrupt
    return real_import(name, *args, **kwargs)
builtins.__import__ = interrupting
from largebatch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_while_importing_torch_exits_130_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-c", INTERRUPTED_IMPORT, "train", "--method", "sgd", "--batch", "128",
                           "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 128 + signal.SIGINT, done.stderr
    assert done.stderr == "largebatch: interrupted\n"
    assert not (tmp_path / "run").exists()


@needs_fashion_mnist
@pytest.mark.parametrize("delay", [1.0, 3.0])
def test_a_real_ctrl_c_during_start_up_is_quiet(delay, tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "largebatch.cli", "train", "--method", "sgd", "--batch", "128",
                                "--epochs", "1", "--run-dir", str(tmp_path / "run"), *SLICE],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    # Whenever it lands (imports, data, or the first steps, where the run stops with a checkpoint): exit 130.
    # A Ctrl-C inside code that exec() runs (dataclass set-up during the imports) makes Python end by SIGINT
    # after main() returned, which a shell reports as 130 too.
    assert process.returncode in (0, 128 + signal.SIGINT, -signal.SIGINT), err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def inline_commands(page: str) -> list[str]:
    """Every `largebatch train|sweep|tune ...` code span of a page (spans may break across lines)."""
    text = (ROOT / page).read_text()
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # blocks are run by test_docs
    spans = re.findall(r"`([^`]+)`", text)
    return [" ".join(span.split()) for span in spans if re.match(r"\s*largebatch\s+(train|sweep|tune)\b", span)]


@pytest.mark.parametrize("page", ["README.md", "docs/guide.md"])
def test_inline_commands_parse_as_written(page, capsys):
    commands = inline_commands(page)
    for command in commands:
        try:
            build_parser().parse_args(shlex.split(command)[1:])
        except SystemExit:
            pytest.fail(f"{page}: `{command}` does not parse: {capsys.readouterr().err.strip()}")


def test_the_guides_example_statistics_command_is_complete():
    commands = [c for c in inline_commands("docs/guide.md") if "--statistics example" in c and "train" in c]
    assert commands, "the guide's `largebatch train ... --statistics example` command is gone"


@needs_fashion_mnist
def test_the_guides_example_statistics_command_runs(tmp_path, capsys):
    command = next(c for c in inline_commands("docs/guide.md") if "--statistics example" in c and "train" in c)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # a relative --run-dir lands here
    try:
        # As written, on a slice: one epoch of 1,024 images is a step of the batch of 1,024.
        assert main([*shlex.split(command)[1:], "--epochs", "1", *SLICE]) == 0
    finally:
        os.chdir(cwd)
    assert "lena batch 1024: test accuracy" in capsys.readouterr().out


def stated_minutes(text: str) -> list[float]:
    return [float(m) for m in re.findall(r"about (\d+(?:\.\d+)?) min", text)]


def test_readme_and_dev_state_the_same_duration_for_the_main_job():
    readme = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("./dev main"))
    dev = (ROOT / "dev").read_text()
    dev_main = dev[dev.index("    main)"):dev.index("exec", dev.index("    main)"))]
    assert stated_minutes(readme) and stated_minutes(readme) == stated_minutes(dev_main), (readme, dev_main)


def test_the_front_page_says_what_study_commit_does_wherever_it_suggests_it():
    for line in (ROOT / "README.md").read_text().splitlines():
        if "--commit" in line:
            assert "git" in line and "checkout" in line, line
