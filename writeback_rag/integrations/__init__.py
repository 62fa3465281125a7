"""Adapters for the frameworks RAG apps are written in (each an optional extra): LangChain, LlamaIndex,
Haystack. Each returns what `KnowledgeBase.search` returns, as the framework's own document type, with the
query id in the metadata so the app can send feedback for it."""


def hit_metadata(hit, query_id):
    """What every adapter puts beside a hit's text: enough to cite it and to give feedback on it."""
    return {"doc_id": hit.doc_id, "chunk_id": hit.chunk_id, "title": hit.title, "kind": hit.kind,
            "rank": hit.rank, "score": hit.score, "bm25": hit.bm25, "dense": hit.dense, "source": hit.source,
            "page": (hit.meta or {}).get("page"), "meta": dict(hit.meta or {}), "query_id": query_id}


def feedback_from(kb, documents, correct, used=None, answer=None, source="app"):
    """Feedback for the query that retrieved `documents` (any adapter's documents, or their metadata
    dicts); `used`: those that carried the answer (default: none named). Returns the feedback id."""
    metas = [_meta(d) for d in documents]
    query_ids = {m["query_id"] for m in metas if m.get("query_id") is not None}
    if len(query_ids) != 1:
        from ..errors import InputError

        raise InputError(f"documents come from {len(query_ids)} logged queries; give those of one search "
                         "(searches with log=False cannot take feedback)")
    docs = [_meta(d)["doc_id"] for d in (used or [])]
    return kb.feedback(query_ids.pop(), correct, docs=docs, answer=answer, source=source)


def _meta(doc):
    if isinstance(doc, dict):
        return doc
    for attr in ("metadata", "meta"):  # LangChain / LlamaIndex nodes; Haystack
        m = getattr(doc, attr, None)
        if isinstance(m, dict):
            return m
    node = getattr(doc, "node", None)  # LlamaIndex NodeWithScore
    if node is not None:
        return node.metadata
    raise TypeError(f"not a retrieved document: {type(doc).__name__}")
