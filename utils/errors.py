"""The one exception type for mistakes a user can fix; scripts print its message without a traceback."""


class UserError(Exception):
    """A problem with the user's files, data or settings, with a message saying what to do."""
