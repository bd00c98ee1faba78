"""The one exception type for expected mistakes (bad input, missing runtime).

The CLI prints a ``UserError`` as a single line and exits non-zero; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """An expected, user-fixable problem. The message names the problem and the fix."""


def missing(module: str) -> bool:
    """True when the optional package providing ``module`` is not installed."""
    import importlib.util

    return importlib.util.find_spec(module) is None


def install_hint(module: str, extra: str) -> str:
    """The one-line reason an optional feature is off: which extra brings ``module``."""
    return f"{module} is not installed; pip install 'edgerepvgg[{extra}]'"
