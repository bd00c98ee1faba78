"""The one exception type for expected mistakes (bad input, missing runtime).

The CLI prints a ``UserError`` as a single line and exits non-zero; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """An expected, user-fixable problem. The message names the problem and the fix."""
