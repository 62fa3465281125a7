"""kb.check() / `wbrag check`: every index compared with the records; damage is found and repaired."""

import json
import os

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import CORPUS
from writeback_rag import KnowledgeBase
from writeback_rag.cli import app
from writeback_rag.errors import NotAKnowledgeBase
from writeback_rag.index import DenseIndex

runner = CliRunner()


@pytest.fixture
def kb_path(tmp_path):
    path = str(tmp_path / "kb")
    assert runner.invoke(app, ["init", "--kb", path, "--embedder", "hash"]).exit_code == 0
    # HNSW: the dense index with a file of its own (a flat one is built from the stored vectors)
    assert runner.invoke(app, ["config", "--kb", path, "dense.index=hnsw"]).exit_code == 0
    assert runner.invoke(app, ["ingest", "--kb", path, CORPUS, "--quiet"]).exit_code == 0
    assert runner.invoke(app, ["query", "--kb", path, "fog signal"]).exit_code == 0  # saves bm25.npz
    return path


def test_clean_kb_checks_ok(kb_path):
    r = runner.invoke(app, ["check", "--kb", kb_path, "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["ok"] and not rep["problems"] and rep["counts"]["dense_vectors"] == rep["counts"]["active_chunks"] > 40


def test_index_missing_a_chunk_but_labelled_current_is_found_and_repaired(kb_path):
    kb = KnowledgeBase.open(kb_path, notify=lambda m: None)
    expect = kb._indexes._dense_expect()
    dense, _ = DenseIndex.load(kb.dense_path, expect)
    assert dense.seq == kb.generation
    victim = kb.search("Fenwick Point designer", k=1, mode="dense", log=False).hits[0].chunk_id
    ids = [int(i) for i in faiss.vector_to_array(dense.index.id_map) if i != victim]
    lacking = DenseIndex(dense.dim, "hnsw")
    lacking.add(ids, np.stack([dense.index.reconstruct(i) for i in ids]))
    lacking.seq = dense.seq
    lacking.save(kb.dense_path, expect)  # what two writers once left behind
    kb.close()
    r = runner.invoke(app, ["check", "--kb", kb_path])
    assert r.exit_code == 1 and "(file) at change" in r.output and "lacks 1 active chunks" in r.output
    assert "wbrag reindex" in r.output
    assert runner.invoke(app, ["reindex", "--kb", kb_path, "--quiet"]).exit_code == 0
    assert runner.invoke(app, ["check", "--kb", kb_path]).exit_code == 0


def _overwrite_vectors(kb_path):
    path = os.path.join(kb_path, "dense.faiss")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # header intact, vectors overwritten
        f.seek(size // 2)
        f.write(b"\x00" * 4096)


def test_overwritten_vectors_fail_the_checksum_and_are_rebuilt(kb_path):
    _overwrite_vectors(kb_path)
    notes = []
    kb = KnowledgeBase.open(kb_path, notify=notes.append)
    assert kb.search("Fenwick Point designer", k=1, mode="dense", log=False).hits[0].doc_id == "fenwick-point-light.md"
    assert any("checksum" in n and "rebuilding" in n for n in notes)
    kb.close()
    _overwrite_vectors(kb_path)
    kb = KnowledgeBase.open(kb_path, notify=lambda m: None)
    rep = kb.check()
    assert not rep["ok"] and any("checksum" in p for p in rep["problems"])
    assert kb.check()["ok"]  # the check's own catch-up rebuilt and saved the file
    kb.close()


def test_empty_or_foreign_database_is_refused_before_anything_is_written(kb_path, tmp_path):
    dense = os.path.join(kb_path, "dense.faiss")
    before = open(dense, "rb").read()
    open(os.path.join(kb_path, "kb.sqlite"), "wb").close()  # 0 bytes
    for name in ("kb.sqlite-wal", "kb.sqlite-shm"):
        if os.path.exists(os.path.join(kb_path, name)):
            os.remove(os.path.join(kb_path, name))
    with pytest.raises(NotAKnowledgeBase, match="not a writeback-rag database"):
        KnowledgeBase.open(kb_path)
    r = runner.invoke(app, ["query", "--kb", kb_path, "fog"])
    assert r.exit_code == 3 and "restore kb.sqlite from a backup" in r.output
    assert open(dense, "rb").read() == before and os.path.getsize(os.path.join(kb_path, "kb.sqlite")) == 0
    import sqlite3

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    c = sqlite3.connect(foreign / "kb.sqlite")
    c.execute("CREATE TABLE t(x)")
    c.commit()
    c.close()
    with pytest.raises(NotAKnowledgeBase):
        KnowledgeBase.open(foreign)
    c = sqlite3.connect(foreign / "kb.sqlite")
    assert [r[0] for r in c.execute("SELECT name FROM sqlite_master")] == ["t"]
    c.close()


def test_read_only_kb_serves_searches_without_logging_and_writes_nothing(kb_path, monkeypatch):
    """A KB on read-only media (here: the folder reported unwritable) opens read-only: searches without
    logging, stats, check and the query log work; logging is refused in one line; no file changes."""
    import hashlib

    kb = KnowledgeBase.open(kb_path)
    kb.ingest([{"id": "late", "text": "A late note about the foghorn at Skerrow."}])  # index files now behind
    kb.close()
    os.remove(os.path.join(kb_path, "bm25.npz"))  # and one missing: rebuilt in memory only

    def digest():
        return {n: hashlib.sha256(open(os.path.join(kb_path, n), "rb").read()).hexdigest()
                for n in sorted(os.listdir(kb_path)) if not n.endswith(("-wal", "-shm"))}  # SQLite's own

    before = digest()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p).startswith(kb_path) and mode == os.W_OK
                        else real(p, mode, **k))
    for cmd in (["query", "--no-log", "foghorn Skerrow"], ["stats"], ["check"], ["log"]):
        r = runner.invoke(app, [cmd[0], "--kb", kb_path] + cmd[1:])
        assert r.exit_code == 0, (cmd, r.output)
    r = runner.invoke(app, ["query", "--kb", kb_path, "--no-log", "foghorn Skerrow", "--json"])
    assert json.loads(r.output)["hits"][0]["doc_id"] == "late"
    r = runner.invoke(app, ["query", "--kb", kb_path, "foghorn"])
    assert r.exit_code == 6 and "read-only" in r.output and "--no-log" in r.output
    kb = KnowledgeBase.open(kb_path)
    assert kb.readonly and kb.search("foghorn", mode="dense", log=False).hits
    kb.close()
    assert digest() == before


def test_term_statistics_that_differ_from_the_text_are_found(kb_path):
    """Write-back's distiller reads each term's stored document frequency: drift from the chunks is a
    problem, and reindex recounts them."""
    import sqlite3

    c = sqlite3.connect(os.path.join(kb_path, "kb.sqlite"))
    c.execute("UPDATE terms SET df=df+1")
    c.commit()
    c.close()
    r = runner.invoke(app, ["check", "--kb", kb_path])
    assert r.exit_code == 1 and "term statistics" in r.output and "wbrag reindex" in r.output
    assert runner.invoke(app, ["reindex", "--kb", kb_path, "--quiet"]).exit_code == 0
    assert runner.invoke(app, ["check", "--kb", kb_path]).exit_code == 0


def test_read_only_media_falls_back_to_an_immutable_open(kb_path, monkeypatch):
    """Where SQLite cannot even create the WAL's shared memory (read-only media), mode=ro fails; the KB then
    opens with immutable=1 and still serves searches without logging, stats and check."""
    import sqlite3

    from writeback_rag import store

    real = sqlite3.connect
    used = []

    def connect(database, *a, **k):
        if "mode=ro" in str(database):
            raise sqlite3.OperationalError("unable to open database file")
        used.append(str(database))
        return real(database, *a, **k)

    monkeypatch.setattr(store.sqlite3, "connect", connect)
    kb = KnowledgeBase.open(kb_path, readonly=True, notify=lambda m: None)
    assert kb.search("Fenwick Point designer", k=1, mode="hybrid", log=False).hits
    assert kb.stats()["documents"] > 40 and kb.check()["ok"]
    assert used and all("immutable=1" in u for u in used)
    kb.close()
