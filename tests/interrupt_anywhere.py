"""Ctrl-C at any line: KeyboardInterrupt raised at random Python line events of fine_tuning.py
during a dry run (or the resume of a stopped one), each in a fresh run folder. Every ending must be
exit 130 (or 0) without a traceback, and leave the run folder resumable (the resume then finishes),
finished, or gone (or empty). A check to run after changing the plumbing, not a test: it takes
minutes.

    python tests/interrupt_anywhere.py --points 400
    python tests/interrupt_anywhere.py --points 150 --resume
"""

import argparse
import contextlib
import io
import random
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fine_tuning as ft  # noqa: E402

DRY_RUN = ["--dry-run", "--epochs", "3", "--patience", "5"]


def run_with_interrupt(args, at=None):
    """ft.cli(args) with KeyboardInterrupt at its `at`-th line event: (exit code or traceback,
    stderr, the line events from main()'s first to its return). Before and after, only cli's
    first and last lines run, where an interrupt escapes as in any Python program."""
    events = 0
    main_events = range(0)

    def tracer(frame, event, arg):
        nonlocal events, main_events
        if frame.f_code.co_filename != ft.__file__:
            return None
        if event == "line":
            events += 1
            if events == at:
                raise KeyboardInterrupt
        if frame.f_code.co_name == "main" and event == "call":
            main_events = range(events + 1, events + 1)
        if frame.f_code.co_name == "main" and event == "return":
            main_events = range(main_events.start, events + 1)
        return tracer

    torch.set_grad_enabled(True)  # an interrupt may skip a with-block's __exit__ (bpo-29988)
    err = io.StringIO()
    sys.settrace(tracer)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = ft.cli([str(arg) for arg in args])
    except BaseException as error:  # what the learner would see as a traceback
        code = "".join(traceback.format_exception(error))[-600:]
    finally:
        sys.settrace(None)
    return code, err.getvalue(), main_events


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="interrupt the resume of a run")
    options = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    start = [*DRY_RUN, "--output-dir", root / "first", "--run-name", "run"]
    if options.resume:  # a run stopped in epoch 2, whose last.pt holds epoch 1
        events = run_with_interrupt([*DRY_RUN, "--output-dir", root / "count"])[2]
        for share in range(40, 90, 5):
            shutil.rmtree(root / "first", ignore_errors=True)
            run_with_interrupt(start, at=events.start + len(events) * share // 100)
            last = root / "first" / "run" / "last.pt"
            if last.exists() and torch.load(last, weights_only=True)["epoch"] == 1:
                break
    events = run_with_interrupt(make_args(options, root, "count"))[2]
    random.seed(options.seed)
    problems = 0
    for at in sorted(random.sample(events, min(options.points, len(events)))):
        code, err, _ = run_with_interrupt(make_args(options, root, f"at-{at}"), at)
        problem = problem_after(code, err, root / f"at-{at}" / "run")
        if problem:
            problems += 1
            print(f"interrupt at line event {at}: {problem}")
    tried = min(options.points, len(events))
    print(f"{len(events)} line events in main(), {tried} interrupted: {problems} problems")
    shutil.rmtree(root)
    return 1 if problems else 0


def problem_after(code, err, run_dir):
    """What is wrong with the ending of an interrupted run, or None."""
    if code not in (0, 130) or (err and code != 0):
        return f"exit {code!r}, stderr {err!r}"
    if (run_dir / "last.pt").exists():
        code, err, _ = run_with_interrupt(["--resume", run_dir])
        if code != 0:
            return f"its resume: exit {code!r}, stderr {err!r}"
    elif run_dir.exists() and not (run_dir / "results.json").exists():
        left = sorted(path.name for path in run_dir.iterdir())
        if left:  # empty: interrupted between mkdir and the run's taking it, microseconds
            return f"left {left}"
    return None


def make_args(options, root, name):
    if options.resume:
        return ["--resume", shutil.copytree(root / "first" / "run", root / name / "run")]
    return [*DRY_RUN, "--output-dir", root / name, "--run-name", "run"]


if __name__ == "__main__":
    sys.exit(main())
