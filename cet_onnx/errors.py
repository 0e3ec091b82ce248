"""Error types that the CLI maps to exit codes.

``InputError`` is a user mistake (bad file, bad option, mismatched data): exit code 2.
``RuntimeFailure`` is something that went wrong while working on valid input
(onnxruntime refused the emitted model, a verification gate failed): exit code 1.
Messages are one line and name the file or tensor involved.
"""

from __future__ import annotations


class CetError(Exception):
    """Base class of every error cet-onnx reports without a traceback."""

    exit_code = 1


class InputError(CetError):
    """The user's input or options are wrong (exit code 2)."""

    exit_code = 2


class RuntimeFailure(CetError):
    """Valid input, but the work failed or a quality gate was not met (exit code 1)."""

    exit_code = 1


def first_line(exc: BaseException, default: str | None = None) -> str:
    """The first line of an exception's message, for one-line error reports.

    An empty message gives ``default``, else the exception's type name.
    """
    text = str(exc).strip()
    if text:
        return text.splitlines()[0]
    return type(exc).__name__ if default is None else default
