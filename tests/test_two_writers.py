"""Two writers on one KB (two KnowledgeBase objects stand for two processes: each has its own in-memory
indexes), interleaved deterministically at the points where the fault study lost data."""

import pytest

from writeback_rag import KnowledgeBase
from writeback_rag.backends import HashEmbedder


def _open(path):
    return KnowledgeBase.open(path, notify=lambda m: None)


def _dense_finds(path, doc_id, text):
    kb = _open(path)
    try:
        hits = kb.search(text, k=3, mode="dense", filters={"doc": doc_id}, log=False).hits
        return bool(hits) and hits[0].doc_id == doc_id
    finally:
        kb.close()


class _Interleaving(HashEmbedder):
    """Runs `then` once, in the middle of an ingest: after the existence check, before the write."""

    def __init__(self, then):
        super().__init__()
        self.then = then

    def encode(self, texts, show_progress=False):
        if self.then:
            then, self.then = self.then, None
            then()
        return super().encode(texts)


def test_other_writers_commit_is_never_lost_from_the_dense_index(tmp_path):
    path = tmp_path / "kb"
    KnowledgeBase.create(path, embedder="hash", notify=lambda m: None).close()
    a, b = _open(path), _open(path)
    a.ingest([{"id": "first", "text": "The lamp room holds a first-order Fresnel lens."}])
    # b commits while a is in the middle of its ingest: after a loaded its FAISS index, before a commits
    a._embedder = _Interleaving(lambda: b.ingest([{"id": "from-b", "text": "Storm shutters guard the keeper's "
                                                                           "cottage windows."}]))
    a.ingest([{"id": "from-a", "text": "A clockwork drive turns the optic every thirty seconds."}])
    a.close()
    b.close()
    for doc, text in (("first", "Fresnel lens lamp room"), ("from-b", "storm shutters cottage windows"),
                      ("from-a", "clockwork drive optic")):
        assert _dense_finds(path, doc, text), doc
    kb = _open(path)
    assert kb.search("storm shutters cottage", k=1, mode="hybrid", log=False).hits[0].doc_id == "from-b"
    kb.close()


def test_same_document_ingested_by_two_writers_at_once_is_stored_once(tmp_path):
    path = tmp_path / "kb"
    KnowledgeBase.create(path, embedder="hash", notify=lambda m: None).close()
    doc = {"id": "cottage", "text": "The keeper's cottage has two rooms. " * 30}
    a, b = _open(path), _open(path)
    a._embedder = _Interleaving(lambda: b.ingest([doc]))
    rep = a.ingest([doc])
    assert (rep.added, rep.updated, rep.unchanged) == (0, 0, 1)
    n = a.conn.execute("SELECT COUNT(*) FROM chunks WHERE doc_id='cottage'").fetchone()[0]
    assert n == len(b.search("keeper cottage rooms", k=50, mode="bm25", log=False).hits) > 1
    changed = {"id": "cottage", "text": "The keeper's cottage was rebuilt in stone. " * 30}
    a._embedder = _Interleaving(lambda: b.ingest([doc | {"text": "Another text. " * 20}]))
    rep = a.ingest([changed])
    assert rep.updated == 1
    seqs = [r[0] for r in a.conn.execute("SELECT seq FROM chunks WHERE doc_id='cottage' ORDER BY id")]
    assert seqs == list(range(len(seqs)))  # one copy of the document's chunks, not two
    assert "rebuilt in stone" in a.document("cottage")["text"]
    a.close()
    b.close()
    kb = _open(path)
    hits = kb.search("rebuilt in stone", k=50, mode="dense", log=False).hits
    assert len({h.chunk_id for h in hits}) == len(seqs)
    kb.close()


def test_searches_are_served_while_an_ingest_runs_in_another_thread(tmp_path):
    """One process, two threads: an ingest is stopped in the middle (after its first batch committed) until
    the main thread has searched, logged and seen that batch; a search that waited for the whole ingest
    would never return, and the ingest would time out."""
    import threading
    import time

    kb = KnowledgeBase.create(tmp_path / "kb", embedder="hash", notify=lambda m: None)
    kb.ingest([{"id": "first", "text": "The lamp room holds a first-order Fresnel lens."}])
    searched, batches = threading.Event(), []

    class Paused(HashEmbedder):
        def encode(self, texts, show_progress=False):
            batches.append(len(texts))
            if len(batches) == 3:  # two batches committed (commit_seconds=0), the third waits for the reader
                assert searched.wait(30), "the search never ran while the ingest was in progress"
            return super().encode(texts)

    kb._embedder = Paused()
    docs = [{"id": f"d{i}", "text": f"Storm number {i} battered the keeper's cottage windows."} for i in range(30)]
    errors = []
    writer = threading.Thread(target=lambda: errors.append(None) if kb.ingest(docs, batch_chunks=10,
                                                                                commit_seconds=0) else None)
    writer.start()
    while len(batches) < 3 and writer.is_alive():
        time.sleep(0.001)
    res = kb.search("storm battered cottage windows", k=50, mode="hybrid")  # logged: a write of its own
    seen = {h.doc_id for h in res.hits}
    searched.set()
    writer.join(60)
    assert not writer.is_alive() and res.query_id is not None
    assert {"d0", "d9", "d10", "d19"} <= seen and "d29" not in seen  # the committed batches, not the paused one
    assert len(kb.search("storm battered cottage windows", k=50, mode="bm25", log=False).hits) == 30
    assert kb.check()["ok"]
    kb.close()


@pytest.mark.slow
def test_stress_writers_and_readers_in_many_processes(tmp_path):
    """eval/stress.py for a few seconds: 2 writer and 2 reader processes (the 5-minute run is in eval/)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "eval"))
    import stress

    rep = stress.run(str(tmp_path / "kb"), seconds=6, writers=2, readers=2)
    assert rep["ok"], rep
    assert rep["ops"].get("ingest") and rep["ops"].get("delete") and rep["searches"] > 10
