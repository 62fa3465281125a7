"""Domain errors. The library says what went wrong and carries a hint per front end (`cli`: a command to
run, `api`: a method to call); each front end renders its own, so no caller reads another's advice."""


class WbragError(Exception):
    """Base for every error a user can act on."""

    exit_code = 1

    def __init__(self, message, cli=None, api=None):
        super().__init__(message)
        self.message = message
        self.hint = {k: v for k, v in (("cli", cli), ("api", api)) if v}

    def render(self, front="api"):
        """The message with the hint for `front` ('cli' or 'api'), or the message alone."""
        hint = self.hint.get(front)
        return f"{self.message}; {hint}" if hint else self.message

    def __str__(self):
        return self.render("api")


class InputError(WbragError):
    """Bad input file, record, argument or setting; names the place and the fix."""

    exit_code = 2


class ConfigError(InputError):
    """A setting that is unknown, of the wrong type or out of range (config.toml, `config=`, `wbrag config`)."""


class NotAKnowledgeBase(WbragError):
    exit_code = 3


class EmbedderMismatch(WbragError):
    exit_code = 4


class UnknownQuery(InputError):
    pass


class StorageError(WbragError):
    """The KB's files cannot be read or written: damaged database, read-only folder, full disk."""

    exit_code = 6


class LockBusy(WbragError):
    """Another write-back run holds the lock (cron overlap)."""

    exit_code = 75  # EX_TEMPFAIL: cron may simply retry later


class LLMError(WbragError):
    """The configured LLM is missing, unreachable, crashed or answered garbage."""

    exit_code = 5


def storage_error(e, path):
    """A StorageError that says what an sqlite3/OS error means for the KB at `path` and what to do."""
    text = str(e).lower()
    if "readonly" in text or "read-only" in text or getattr(e, "errno", None) in (13, 30):
        return StorageError(f"{path}: the knowledge base cannot be written (read-only folder or file)",
                            cli="make the folder writable, or copy the KB folder somewhere writable",
                            api="make the folder writable, or copy the KB folder somewhere writable")
    if "full" in text or getattr(e, "errno", None) == 28:
        return StorageError(f"{path}: the disk is full; nothing was changed by the failed write",
                            cli="free some space and run the command again", api="free some space and retry")
    if "malformed" in text or "not a database" in text or "corrupt" in text:
        return StorageError(f"{path}: the database is damaged ({e})",
                            cli="restore kb.sqlite from a backup (sqlite3 kb.sqlite .recover can save what is left)",
                            api="restore kb.sqlite from a backup (sqlite3 kb.sqlite .recover can save what is left)")
    return StorageError(f"{path}: storage error ({e})")


def translating(convert):
    """A decorator for methods: an exception that `convert(self, e)` turns into a WbragError is raised as
    that error alone (one line for the user); WbragErrors and exceptions it returns None for pass as they are."""
    import functools

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except WbragError:
                raise
            except Exception as e:
                err = convert(self, e)
                if err is None:
                    raise
                raise err from None
        return wrapper
    return decorate

