"""Domain errors: the CLI turns each into one line on stderr and a non-zero exit."""


class WbragError(Exception):
    """Base for every error a user can act on."""

    exit_code = 1


class InputError(WbragError):
    """Bad input file, record or argument; names the place and the fix."""

    exit_code = 2


class NotAKnowledgeBase(WbragError):
    exit_code = 3


class EmbedderMismatch(WbragError):
    exit_code = 4


class UnknownQuery(InputError):
    pass


class LockBusy(WbragError):
    """Another write-back run holds the lock (cron overlap)."""

    exit_code = 75  # EX_TEMPFAIL: cron may simply retry later


class LLMError(WbragError):
    """The configured LLM is missing, unreachable or answered garbage."""

    exit_code = 5
