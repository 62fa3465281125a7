"""LlamaIndex: a BaseRetriever over a KnowledgeBase (`pip install writeback-rag[llamaindex]`).

    retriever = WritebackRetriever(kb, k=5)
    nodes = retriever.retrieve("Who designed the tower?")   # or await retriever.aretrieve(...)
    retriever.feedback(nodes, correct=True, used=nodes[:1])
"""

from typing import Any

from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from . import feedback_from, hit_metadata


class WritebackRetriever(BaseRetriever):
    """NodeWithScore per hit of `kb.search`, in rank order; node id = chunk id, metadata as LangChain's."""

    def __init__(self, kb: Any, k: int = 5, mode: str | None = None, filters: dict | None = None,
                 include_units: bool = True, source: str = "llamaindex", **kwargs: Any) -> None:
        self.kb, self.k, self.mode, self.filters = kb, k, mode, filters
        self.include_units, self.source = include_units, source
        super().__init__(**kwargs)

    def _kwargs(self) -> dict:
        return {"k": self.k, "mode": self.mode, "filters": self.filters, "include_units": self.include_units,
                "source": self.source}

    @staticmethod
    def _nodes(res) -> list[NodeWithScore]:
        return [NodeWithScore(node=TextNode(text=h.text, id_=str(h.chunk_id), metadata=hit_metadata(h, res.query_id)),
                              score=h.score) for h in res.hits]

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return self._nodes(self.kb.search(query_bundle.query_str, **self._kwargs()))

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        """In a worker thread: LlamaIndex's default runs the sync method on the event loop."""
        return self._nodes(await self.kb.asearch(query_bundle.query_str, **self._kwargs()))

    def feedback(self, nodes: list[NodeWithScore], correct: bool, used: list[NodeWithScore] | None = None,
                 answer: str | None = None) -> int:
        """Was the answer built on `nodes` right, and which of them carried it? Returns the feedback id."""
        return feedback_from(self.kb, nodes, correct, used, answer, source=self.source)
