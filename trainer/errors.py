"""The one exception type for mistakes a user can fix (bad spec, missing files, mismatched data), and the
exit statuses of launch/train.py.

    0   the run finished
    2   a user error: the message names the spec field, file, shard or sample key
    3   stopped after train.max_consecutive_nonfinite skipped steps in a row
    4   lost contact with another rank (it died, or hung longer than run.collective_timeout_s)
    75  preempted (SIGTERM/SIGUSR1): a checkpoint was saved; rerun the same command to resume
    other non-zero: a crash
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_LOST_PEER = 4
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again later


class UserError(Exception):
    """A problem with the user's input; the message names the spec field, file, shard or sample key.

    ``on_every_rank``: every rank raises the same error at the same point (start-up decides the same on every
    rank; a data fault under ``fail`` is shared), so one rank saying it is enough. Otherwise each rank that
    raises it says so with its rank number."""

    def __init__(self, message: str, *, on_every_rank: bool = False):
        super().__init__(message)
        self.on_every_rank = on_every_rank

