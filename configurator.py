"""
The settings of every script, from config files and --key=value arguments; the one error a user can fix; devices.
"""


class UserError(Exception):
    """A problem the user can fix; each script's main() prints its one-sentence message and exits non-zero."""
