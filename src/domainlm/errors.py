"""The one exception type users see: the CLI prints its message, without a traceback."""


class DomainLMError(Exception):
    """A problem with the user's input or environment, phrased so they can fix it."""
