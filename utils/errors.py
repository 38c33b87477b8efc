"""The one exception type that scripts turn into a single error line."""


class ToolkitError(Exception):
    """Bad input or a broken file: the message is shown to the user as it is."""
