"""`wbrag mcp`: the knowledge base as tools for a local agent, over stdio (the official `mcp` SDK;
`pip install writeback-rag[mcp]`). Tools: search, feedback, answer, units. stdout carries the protocol
only: notices go to stderr."""

import sys
from typing import Any

from .kb import KnowledgeBase


def build(kb: KnowledgeBase):
    """An MCPServer whose tools call `kb`."""
    from mcp.server import MCPServer

    server = MCPServer("writeback-rag", instructions="Search a local knowledge base; report whether an answer "
                       "built on its hits was right with the feedback tool, so it learns.")

    @server.tool()
    def search(query: str, k: int = 5, mode: str | None = None, filters: dict[str, Any] | None = None) -> dict:
        """Retrieve the top-k chunks (bm25, dense or hybrid). The result's query_id names this search in
        feedback."""
        return kb.search(query, k=max(1, min(int(k), 50)), mode=mode, filters=filters, source="mcp").to_dict()

    @server.tool()
    def feedback(query_id: int, correct: bool, docs: list[str] | None = None, answer: str | None = None) -> dict:
        """Say whether the answer built on a search's hits was right, and which documents (doc_id) carried it."""
        return {"feedback_id": kb.feedback(query_id, correct, docs=docs or [], answer=answer, source="mcp")}

    @server.tool()
    def answer(question: str, k: int = 5) -> dict:
        """Retrieve and answer with the knowledge base's configured LLM."""
        out = kb.answer(question, k=max(1, min(int(k), 50)), source="mcp")
        return {"query_id": out["query_id"], "answer": out["answer"], "hits": [h.to_dict() for h in out["hits"]]}

    @server.tool()
    def units(include_inactive: bool = False) -> list[dict]:
        """The knowledge units the base has learned, with their sources."""
        return [{k: u[k] for k in ("id", "status", "title", "text", "source_doc_ids", "query_ids", "run_id")}
                for u in kb.units(include_inactive=include_inactive)]

    return server


def serve(kb_path: str) -> None:
    """Serve over stdio until the client closes it."""
    kb = KnowledgeBase.open(kb_path, notify=lambda m: print(f"wbrag: {m}", file=sys.stderr))
    try:
        build(kb).run("stdio")
    finally:
        kb.close()
