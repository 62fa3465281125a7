"""writeback-rag: a retrieval knowledge base that gets better the more it is used."""

__version__ = "0.1.0"

from .errors import WbragError  # noqa: E402
from .kb import KnowledgeBase, SearchResult, Hit  # noqa: E402

__all__ = ["KnowledgeBase", "SearchResult", "Hit", "WbragError", "__version__"]
