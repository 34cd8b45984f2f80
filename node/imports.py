"""Import strings, uvicorn's convention: ``"package.module:attribute"``.

Used for the application's jobs (``BATON_JOBS`` / ``--jobs myapp.jobs:registry``)
and for the targets of stored jobs (``"myapp.tasks:sync_tenant"``). Promised:
a failure is one ``ImportStringError`` whose message says what to fix (the
module that is missing, the attribute that is not there, or the exception the
module raised while importing), never a traceback for the user to read.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any

from node.jobs import JobRegistry
from node.triggers import JobSpecError

#: ``module.path:attribute.path``, both dotted Python identifiers.
IMPORT_STRING = re.compile(r"[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


class ImportStringError(ValueError):
    """An import string that does not resolve; the message says why."""


def check_format(ref: str) -> str:
    """``ref`` unchanged, or ``ImportStringError`` when it is not ``module:attribute``."""
    if not IMPORT_STRING.fullmatch(ref):
        raise ImportStringError(f"{ref!r} is not an import string of the form package.module:attribute "
                                "(e.g. myapp.jobs:registry)")
    return ref


def import_string(ref: str) -> Any:
    """The object ``ref`` names. The current directory is importable, as under uvicorn."""
    module_name, _, attr_path = check_format(ref).partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ImportStringError(f"cannot import {module_name!r}: no module named {exc.name!r} (is it "
                                    f"installed, or on PYTHONPATH? the current directory is {os.getcwd()})"
                                    ) from None
        raise ImportStringError(f"importing {module_name!r} failed: {exc}") from None
    except JobSpecError as exc:
        raise ImportStringError(f"importing {module_name!r}: {exc}") from None
    except Exception as exc:
        raise ImportStringError(f"importing {module_name!r} raised {type(exc).__name__}: {exc}") from None
    found: Any = module
    for name in attr_path.split("."):
        try:
            found = getattr(found, name)
        except AttributeError:
            raise ImportStringError(f"module {module_name!r} has no attribute {attr_path!r}") from None
    return found


def load_jobs(ref: str) -> JobRegistry:
    """The ``JobRegistry`` ``ref`` names, or that a function without arguments returns."""
    found = import_string(ref)
    if not isinstance(found, JobRegistry) and callable(found):
        try:
            found = found()
        except JobSpecError as exc:
            raise ImportStringError(f"{ref}(): {exc}") from None
        except Exception as exc:
            raise ImportStringError(f"{ref}() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(found, JobRegistry):
        raise ImportStringError(f"{ref!r} is a {type(found).__name__}, not a node.jobs.JobRegistry (or a "
                                "function returning one)")
    return found
