"""The one exception type that reaches the user as a single line."""


class MlgenError(Exception):
    """A problem the user can fix (bad input, missing stage, changed settings).

    The command line prints its message as one line and exits non-zero, without a traceback.
    """


class ShardFailed(MlgenError):
    """One shard cannot be done (its input is corrupt): the runner goes on with the other shards,
    then stops with this message and leaves the stage incomplete."""
