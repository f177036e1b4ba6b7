"""The one exception type for mistakes a user can fix (bad spec, missing files, mismatched data).

The entrypoint prints its message and exits with EXIT_USER_ERROR instead of a traceback.
"""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input; the message names the spec field, file, shard or sample key."""
