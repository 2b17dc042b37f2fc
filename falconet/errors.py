"""The one exception type that user-facing layers (CLI, server) turn into a clean message."""


class FalconetError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""
