"""LangChain: a BaseRetriever over a KnowledgeBase (`pip install writeback-rag[langchain]`).

    retriever = WritebackRetriever(kb=kb, k=5)
    docs = retriever.invoke("Who designed the tower?")       # or await retriever.ainvoke(...)
    retriever.feedback(docs, correct=True, used=docs[:1])     # the query id travels in the metadata
"""

from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict

from . import feedback_from, hit_metadata


class WritebackRetriever(BaseRetriever):
    """Documents from `kb.search` in rank order, metadata: doc_id, chunk_id, title, kind, rank, score,
    bm25, dense, source, page, meta, query_id."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    kb: Any
    k: int = 5
    mode: str | None = None
    filters: dict | None = None
    include_units: bool = True
    source: str = "langchain"

    def _search_kwargs(self) -> dict:
        return {"k": self.k, "mode": self.mode, "filters": self.filters, "include_units": self.include_units,
                "source": self.source}

    @staticmethod
    def _documents(res) -> list[Document]:
        return [Document(page_content=h.text, metadata=hit_metadata(h, res.query_id), id=str(h.chunk_id))
                for h in res.hits]

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return self._documents(self.kb.search(query, **self._search_kwargs()))

    async def _aget_relevant_documents(self, query: str, *,
                                       run_manager: AsyncCallbackManagerForRetrieverRun) -> list[Document]:
        return self._documents(await self.kb.asearch(query, **self._search_kwargs()))

    def feedback(self, documents: list[Document], correct: bool, used: list[Document] | None = None,
                 answer: str | None = None) -> int:
        """Was the answer built on `documents` right, and which of them carried it? Returns the feedback id."""
        return feedback_from(self.kb, documents, correct, used, answer, source=self.source)
