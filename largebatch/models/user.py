"""A model or dataset given as ``package.module:callable``, imported from the working directory or the
Python path (``--model`` and ``--dataset`` of every command, and the same strings in a ``TrainConfig``).

Under torchrun every rank imports the callable itself, from the same working directory.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from typing import Any

# dotted.module.path:attribute.path
_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_callable_spec(name: str) -> bool:
    """Whether ``name`` names a callable (``package.module:callable``) rather than a built-in."""
    return ":" in name


def check_spec(name: str, option: str) -> None:
    """A one-line ValueError unless ``name`` has the form ``package.module:callable``."""
    if not _SPEC.match(name):
        raise ValueError(f"{option} {name!r}: expected package.module:callable (a module importable from the "
                         "working directory or the Python path, a colon, and the name of a callable in it)")


def import_callable(name: str, option: str) -> Callable:
    """The callable ``package.module:callable`` names, or a one-line ValueError saying what went wrong."""
    check_spec(name, option)
    module_name, attribute = name.split(":")
    # The console script's sys.path starts with its own bin directory, not the working directory, which
    # `python -c` and `python -m` put first: add it, so that a file beside the user's data imports either way.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any failure of the user's module is reported in one line
        raise ValueError(f"{option} {name}: cannot import {module_name} ({type(e).__name__}: {_first_line(e)}); "
                         f"it is looked for in the working directory ({cwd}) and on the Python path") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{option} {name}: {module_name} ({getattr(target, '__file__', None) or module_name}) "
                             f"has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        # ValueError, as for every bad input: the command line reports it in one line.
        raise ValueError(f"{option} {name}: {attribute} is an object of type {type(target).__name__}, "  # noqa: TRY004
                         "not a callable")
    return target


def call_with(target: Callable, name: str, option: str, **keywords: Any) -> Any:
    """``target(**keywords)``, passing only the keywords its signature accepts (all of them when it takes
    ``**kwargs``); a failure becomes a one-line ValueError naming ``option`` and ``name``."""
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: pass everything
        accepted = keywords
    else:
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            accepted = keywords
        else:
            names = {p.name for p in parameters
                     if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
            accepted = {k: v for k, v in keywords.items() if k in names}
    try:
        return target(**accepted)
    except Exception as e:  # noqa: BLE001 - the user's code: one line, with its own exception named
        given = ", ".join(f"{k}={v!r}" for k, v in accepted.items()) or "no arguments"
        raise ValueError(f"{option} {name}: the call with {given} failed ({type(e).__name__}: "
                         f"{_first_line(e)})") from None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else "no message"
