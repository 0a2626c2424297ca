"""Errors a user can cause. The entry point prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input from the user: paths, data, flags, checkpoints."""
