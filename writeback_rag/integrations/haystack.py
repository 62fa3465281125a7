"""Haystack: retriever and feedback components over a KnowledgeBase (`pip install writeback-rag[haystack]`).

    pipe.add_component("retriever", WritebackRetriever(kb_path="kb", top_k=5))
    pipe.add_component("feedback", WritebackFeedback(kb_path="kb"))
A component holds the KB's path (so a pipeline serialises with to_dict/from_dict) and opens it once.
"""

from typing import Any

from haystack import Document, component, default_from_dict, default_to_dict

from . import feedback_from, hit_metadata


class _KBComponent:
    """Opens the KB at `kb_path` on first use (the @component decorator rebuilds classes, so subclasses
    set kb_path and _kb themselves instead of calling super().__init__)."""

    kb_path: str
    _kb: Any

    @property
    def kb(self) -> Any:
        if self._kb is None:
            from ..kb import KnowledgeBase

            self._kb = KnowledgeBase.open(self.kb_path)
        return self._kb


@component
class WritebackRetriever(_KBComponent):
    """Documents from `kb.search` (score, meta as the other adapters: doc_id, ..., query_id)."""

    def __init__(self, kb_path: str, top_k: int = 5, mode: str | None = None, filters: dict | None = None,
                 include_units: bool = True, kb: Any = None) -> None:
        self.kb_path, self._kb = str(kb_path), kb
        self.top_k, self.mode, self.filters, self.include_units = top_k, mode, filters, include_units

    @component.output_types(documents=list[Document])
    def run(self, query: str, top_k: int | None = None, filters: dict | None = None) -> dict:
        res = self.kb.search(query, k=top_k or self.top_k, mode=self.mode, filters=filters or self.filters,
                             include_units=self.include_units, source="haystack")
        return {"documents": [Document(id=str(h.chunk_id), content=h.text, meta=hit_metadata(h, res.query_id),
                                       score=h.score) for h in res.hits]}

    def to_dict(self) -> dict:
        return default_to_dict(self, kb_path=self.kb_path, top_k=self.top_k, mode=self.mode, filters=self.filters,
                               include_units=self.include_units)

    @classmethod
    def from_dict(cls, data: dict) -> "WritebackRetriever":
        return default_from_dict(cls, data)


@component
class WritebackFeedback(_KBComponent):
    """Feedback for the query that retrieved `documents`: was the answer right, which documents carried it."""

    def __init__(self, kb_path: str, kb: Any = None) -> None:
        self.kb_path, self._kb = str(kb_path), kb

    @component.output_types(feedback_id=int)
    def run(self, documents: list[Document], correct: bool, used: list[Document] | None = None,
            answer: str | None = None) -> dict:
        return {"feedback_id": feedback_from(self.kb, documents, correct, used, answer, source="haystack")}

    def to_dict(self) -> dict:
        return default_to_dict(self, kb_path=self.kb_path)

    @classmethod
    def from_dict(cls, data: dict) -> "WritebackFeedback":
        return default_from_dict(cls, data)
