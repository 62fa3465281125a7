"""writeback-rag: a retrieval knowledge base that gets better the more it is used."""

from .version import __version__  # noqa: E402

from .errors import (ConfigError, EmbedderMismatch, InputError, LLMError, LockBusy, NotAKnowledgeBase,  # noqa: E402
                     StorageError, UnknownQuery, WbragError)
from .kb import Hit, IngestReport, KnowledgeBase, SearchResult  # noqa: E402

__all__ = ["KnowledgeBase", "SearchResult", "Hit", "IngestReport", "WbragError", "InputError", "ConfigError",
           "NotAKnowledgeBase", "EmbedderMismatch", "UnknownQuery", "StorageError", "LockBusy", "LLMError",
           "__version__"]
