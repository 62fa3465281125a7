"""kill -9 of one writer while other processes write to the same KB: the KB stays consistent (every index
agrees with the records), the killed job resumes, and an ingest ends with exactly the KB an uninterrupted
run would have left."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from conftest import QUESTIONS, write
from test_writeback import SLOW_RUN
from writeback_rag import KnowledgeBase
from writeback_rag.writeback import list_runs, list_units

QUERIES = ("topic 5 item", "harbour lamp 17", "document 1200 topic")


def _jsonl(path, prefix, n, offset=0):
    with open(path, "w") as f:
        for i in range(offset, offset + n):
            f.write(json.dumps({"id": f"{prefix}{i}", "text": f"Document {i} about topic {i % 97} and item {i}. "
                                                             f"The harbour lamp {i % 31} was lit. " * 2}) + "\n")
    return str(path)


def _ingest(kb, data):
    return subprocess.Popen([sys.executable, "-m", "writeback_rag.cli", "ingest", "--kb", kb, data, "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _count(db, prefix):
    c = sqlite3.connect(db, timeout=30)
    try:
        return c.execute("SELECT COUNT(*) FROM documents WHERE id LIKE ?", (prefix + "%",)).fetchone()[0]
    finally:
        c.close()


def _state(path):
    """What a user can see: documents with their chunk texts, and ranked (doc, score) lists per mode."""
    kb = KnowledgeBase.open(path, notify=lambda m: None)
    rep = kb.check()
    assert rep["ok"], rep
    docs = {}
    for doc_id, text in kb.conn.execute("SELECT doc_id, text FROM chunks ORDER BY doc_id, seq"):
        docs.setdefault(doc_id, []).append(text)
    ranks = {(q, m): _ranked(kb.search(q, k=10, mode=m, log=False).hits) for q in QUERIES for m in ("bm25", "dense")}
    kb.close()
    return docs, ranks


def _ranked(hits):
    """The scores in rank order, and which document holds each score above the last one (equal scores are
    ordered by chunk id, which depends on the order of commits)."""
    scores = [round(h.score, 4) for h in hits]
    return scores, sorted((h.doc_id, s) for h, s in zip(hits, scores) if s > scores[-1])


@pytest.mark.parametrize("kill_at,backend", [(1, "embedded"), (700, "embedded"), (1800, "embedded"),
                                             (700, "milvus")], indirect=["backend"])
def test_killed_ingest_among_concurrent_writers_resumes_to_the_uninterrupted_kb(tmp_path, kill_at, kb_config):
    kb = str(tmp_path / "kb")
    KnowledgeBase.create(kb, embedder="hash", notify=lambda m: None, config=kb_config).close()
    a = _jsonl(tmp_path / "a.jsonl", "a", 2500)
    b = _jsonl(tmp_path / "b.jsonl", "b", 1200, offset=5000)
    db = os.path.join(kb, "kb.sqlite")
    pa, pb = _ingest(kb, a), _ingest(kb, b)  # two writer processes at once
    deadline = time.time() + 120
    while time.time() < deadline and _count(db, "a") < kill_at and pa.poll() is None:
        time.sleep(0.01)
    assert pa.poll() is None, "the ingest ended before the kill"
    pa.send_signal(signal.SIGKILL)
    pa.wait()
    assert pb.wait(timeout=120) == 0, pb.stderr.read()
    stored = _count(db, "a")
    assert stored < 2500, "the kill must land mid-ingest"
    k = KnowledgeBase.open(kb, notify=lambda m: None)
    assert k.check()["ok"]  # consistent right after the kill, before anything is repaired
    rep = k.ingest([a])
    assert rep.unchanged == stored and rep.added == 2500 - stored and not rep.skipped
    k.close()

    twin = str(tmp_path / "twin")
    KnowledgeBase.create(twin, embedder="hash", notify=lambda m: None, config=kb_config).ingest([b, a])
    assert _state(kb) == _state(twin)


OTHER_WRITER = """
import sys
from writeback_rag import KnowledgeBase
kb = KnowledgeBase.open(sys.argv[1], notify=lambda m: None)
for i in range(40):
    kb.ingest([{"id": f"other{i}", "text": f"Unrelated note {i} on gulls and ferries."}])
    res = kb.search("ferries gulls", k=3)
    kb.feedback(res.query_id, correct=True)
    if i % 10 == 9:
        kb.delete([f"other{i - 5}"])
"""


@pytest.mark.parametrize("kill_after_units", [0, 4])
def test_killed_writeback_among_concurrent_writers_resumes_consistently(tmp_path, corpus_kb, kill_after_units):
    """Write-back killed while another process ingests, searches, gives feedback and deletes: the KB checks
    clean, the resumed run owns every unit of the night, and every active unit is found in both indexes."""
    kb = corpus_kb
    kb.label(QUESTIONS, split="train")
    kb.close()
    run = subprocess.Popen([sys.executable, write(tmp_path / "slow.py", SLOW_RUN), kb.path],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    other = subprocess.Popen([sys.executable, write(tmp_path / "other.py", OTHER_WRITER), kb.path],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = os.path.join(kb.path, "kb.sqlite")
    deadline = time.time() + 60
    while time.time() < deadline and run.poll() is None:
        c = sqlite3.connect(db, timeout=30)
        units = c.execute("SELECT COUNT(*) FROM units").fetchone()[0]
        started = c.execute("SELECT COUNT(*) FROM runs WHERE status='running'").fetchone()[0]
        c.close()
        if started and units >= kill_after_units:
            break
        time.sleep(0.02)
    assert run.poll() is None, "the run ended before the kill"
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert other.wait(timeout=120) == 0, other.stderr.read()
    k = KnowledgeBase.open(kb.path, notify=lambda m: None)
    assert k.check()["ok"]
    k.writeback()
    rep = k.check()
    assert rep["ok"], rep
    done = [r["id"] for r in list_runs(k) if r["status"] == "done"]
    night = [u for u in list_units(k) if u["run_id"] not in done[1:]]
    assert night and all(u["run_id"] == done[0] for u in night)
    for u in list_units(k, include_inactive=False):
        for mode in ("bm25", "dense"):
            hits = k.search(u["title"] + " " + u["text"][:80], k=3, mode=mode, filters={"doc": u["id"]},
                            log=False, max_units=-1).hits
            assert hits and hits[0].doc_id == u["id"], (mode, u["id"])
    k.close()
