"""The one exception type for bad user input.

Entry points catch it, print ``error: <message>`` on one line and exit with status 2, so a user sees what
is wrong and how to fix it instead of a traceback from deep inside a library.
"""


class UserError(Exception):
    """Bad input that the user can fix; the message names the problem and the fix on one line."""
