"""Errors that the command line shows as one clear message instead of a traceback."""


class LlavaGMError(Exception):
    """A problem the user can fix: the message names the file, field or sample and what to do."""
