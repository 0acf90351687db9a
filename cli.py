"""The command line and the files of metricrl.py, metricrl_continuous.py and experiments.py:
flags from a dataclass of knobs (each knob's comment is its --help), bad input refused in one
line (exit code 2), output written whole or not at all. Nothing here is the method."""
import argparse
import contextlib
import dataclasses
import inspect
import os
import re
import shutil
import sys
import time
from typing import get_args


class UsageError(Exception):
    """Bad input: one line on stderr, exit code 2."""


def say(text):
    """print, and keep running when stdout is closed (python metricrl.py | head -1)."""
    with contextlib.suppress(BrokenPipeError):
        return print(text, flush=True)
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # later prints: nowhere


@contextlib.contextmanager
def staged(out, names):
    """Write `names` in a hidden folder in `out`, then move them in: nothing half-written."""
    tmp = os.path.join(out, f".partial-{os.getpid()}-{time.time_ns()}")
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror})") from None
    try:
        yield tmp
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv, knobs, prog=None):
    """A flag per knob of the dataclass `knobs`, its comment as its help -> (knobs, the names
    of the flags given). --help: prog (default: the knobs' file) and that file's first line."""
    module = sys.modules[knobs.__module__]
    prog = prog or os.path.basename(getattr(module, "__file__", "python"))
    helps = {}
    for cls in knobs.__mro__[-2::-1]:  # the base classes first, `object` left out
        helps.update(re.findall(r"^    (\w+): .+  # (.+)$", inspect.getsource(cls), re.M))
    parser = argparse.ArgumentParser(prog, usage=argparse.SUPPRESS,  # errors: one line
                                     description=(module.__doc__ or "").split("\n")[0],
                                     argument_default=argparse.SUPPRESS)  # not given: not in
    for field in dataclasses.fields(knobs):
        flag = "--" + field.name.replace("_", "-")
        text = helps.get(field.name, "")  # a knob without a comment: no help text
        kind = type(field.default)
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=text)
            continue
        if field.default != "":
            text += f" (default: {field.default})"
        choices = get_args(field.type) or None  # a Literal's values
        parser.add_argument(flag, type=kind, choices=choices, help=text)
    known, unknown = parser.parse_known_args(argv)
    if unknown:  # --compare, say: a flag of experiments.py
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (sweeps: experiments.py)")
    given = vars(known)
    return knobs(**given), set(given)


def require(args, name, ok, what):
    """Raise UsageError, naming the flag and its value, unless ok."""
    if not ok:
        raise UsageError(f"--{name.replace('_', '-')} must be {what}, got {getattr(args, name)!r}")


def exit_with_one_line(prog, error):
    """Exit codes: 2 bad input (one line, no traceback), 1 diverged, 130 Ctrl-C."""
    code, note = 2, ""
    if isinstance(error, FloatingPointError):
        code, note = 1, " (nothing was written)"
    if isinstance(error, KeyboardInterrupt):
        code, note = 130, "interrupted: nothing half-written; the same command resumes a sweep"
    print(f"{prog}: error: {error}{note}", file=sys.stderr)
    sys.exit(code)
