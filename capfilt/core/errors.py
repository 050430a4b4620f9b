"""Errors a user can act on. The CLI prints them in one line and exits with code 2."""


class CapfiltError(Exception):
    """Bad input or a state the user can fix: what was wrong, with which input, what to do."""

    exit_code = 2


class StageNotRunError(CapfiltError):
    """A command needs the output of a stage that has not run on this dataset."""
