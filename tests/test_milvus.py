"""The milvus backend against the real engine (milvus-lite's C++ Milvus on loopback, started by conftest), beside
the embedded default: the same results, other processes' writes, filters pushed down, moving a KB both ways
without re-embedding, `check` finding damage, and the CLI (kill -9 of an ingest among other writers: test_kill_concurrent.py). test_writeback.py,
test_behaviour.py, test_api.py and test_integrations.py run their KB tests on both backends (BACKENDS)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import CORPUS
from writeback_rag import KnowledgeBase
from writeback_rag.backends import HashEmbedder
from writeback_rag.errors import WbragError
from writeback_rag.filters import Filter
from writeback_rag.milvus import MilvusCollection, collection_name, connect

QUERIES = ("Who built Fenwick Point Light?", "lighthouse stamps", "fog signal at Corran Head", "keepers' wives")


def milvus_cfg(uri):
    return {"index": {"backend": "milvus"}, "milvus": {"uri": uri}}


def make(path, uri=None):
    return KnowledgeBase.create(path, embedder="hash", notify=lambda m: None, config=milvus_cfg(uri) if uri else None)


def ranked(kb, q, mode, k=5, **kw):
    return [h.doc_id for h in kb.search(q, k=k, mode=mode, log=False, **kw).hits]


def test_same_corpus_ranks_the_same_on_both_backends(tmp_path, milvus_uri):
    emb, mil = make(tmp_path / "e"), make(tmp_path / "m", milvus_uri)
    emb.ingest([CORPUS])
    mil.ingest([CORPUS])
    for q in QUERIES:
        assert ranked(mil, q, "dense") == ranked(emb, q, "dense")  # the same vectors, exact search
        e = emb.search(q, k=5, mode="dense", log=False).hits
        m = mil.search(q, k=5, mode="dense", log=False).hits
        assert [h.score for h in m] == pytest.approx([h.score for h in e], abs=1e-5)
        # BM25 over the same tokens; Milvus's own statistics shift scores a little, not the winner
        assert ranked(mil, q, "bm25", k=1) == ranked(emb, q, "bm25", k=1)
        assert ranked(mil, q, "hybrid", k=1) == ranked(emb, q, "hybrid", k=1)
        assert len(ranked(mil, q, "hybrid", k=7)) == 7
    rep = mil.check()
    assert rep["ok"] and rep["counts"]["indexed_chunks"] == rep["counts"]["active_chunks"] == emb.stats()["chunks"]


def test_update_delete_and_filters(tmp_path, milvus_uri):
    kb = make(tmp_path / "kb", milvus_uri)
    kb.ingest([{"id": "a/zebra", "text": "The zebra grazes on the savanna grass.", "lang": "en", "n": 3},
               {"id": "b/okapi", "text": "The okapi hides in the rainforest.", "lang": "fr", "score": 0.5},
               {"id": "b/zebra-fr", "text": "Le zebra grazes pres du lac.", "lang": "fr"}])
    for mode in ("bm25", "dense", "hybrid"):
        assert ranked(kb, "zebra grazes savanna", mode)[0] == "a/zebra"
        assert ranked(kb, "zebra grazes", mode, filters={"doc": "b/*"}) == ["b/zebra-fr"] + \
            (["b/okapi"] if mode != "bm25" else [])  # pushed down as doc_id like "b/%"
        assert ranked(kb, "zebra", mode, filters={"lang": "fr"})[0] == "b/zebra-fr"  # ids from the records
        assert set(ranked(kb, "zebra", mode, filters={"lang": "fr"})) <= {"b/zebra-fr", "b/okapi"}
        assert ranked(kb, "zebra", mode, filters={"lang": "de"}) == []
        assert ranked(kb, "zebra", mode, filters={"meta.n": 3}) == ["a/zebra"]
        assert ranked(kb, "zebra", mode, filters={"doc": "?/zebra*"})[0] in ("a/zebra", "b/zebra-fr")
        assert ranked(kb, "zebra", mode, filters={"kind": "unit"}) == []
        assert ranked(kb, "okapi", mode, filters={"score": 0.5}) == ["b/okapi"]  # a float: ids from the records
    # pushed down as Milvus expressions; only what Milvus cannot say the same way goes as the records' ids
    expr = lambda f: kb._indexes.expression(kb.records, Filter.parse(f))  # noqa: E731
    assert expr({"lang": "fr"}) == '(meta["lang"] == "fr")' and expr({"meta.n": 3}) == '(meta["n"] == "3")'
    assert expr({"doc": "b/*"}) == '(doc_id like "b/%")' and expr({"lang": "de"}) == '(meta["lang"] == "de")'
    for f in ({"score": 0.5}, {"doc": "?/zebra*"}, {"doc": "[ab]/*"}, {"lang": "x" * 300}, {"lang": "[1]"},
              {"n": 2 ** 70}, {"la-ng": "fr"}):  # whose text could differ between the two: the records' ids
        assert expr(f) is None or expr(f).startswith("(id in ["), f
    assert expr({"doc": "[x]*"}) is None
    kb.ingest([{"id": "a/zebra", "text": "The quagga once lived on the plains.", "lang": "en"}])
    kb.delete(["b/okapi"])
    for mode in ("bm25", "dense", "hybrid"):
        assert "a/zebra" not in ranked(kb, "zebra grazes savanna", mode, k=3)[:1]
        assert ranked(kb, "quagga plains", mode)[0] == "a/zebra"
        assert "b/okapi" not in ranked(kb, "okapi rainforest", mode)
    assert kb.check()["ok"]


def test_another_process_writes_are_seen_by_the_next_search(tmp_path, milvus_uri):
    kb = make(tmp_path / "kb", milvus_uri)
    kb.ingest([CORPUS])
    assert ranked(kb, "Fenwick Point", "bm25")  # this process is caught up
    code = ("import sys; from writeback_rag import KnowledgeBase as K; k = K.open(sys.argv[1]); "
            "k.ingest([{'id': 'late', 'text': 'A kraken was sighted off Tulloch Ness by the relief boat.'}]); "
            "k.delete(['fenwick-point-light.md']); k.search('kraken', k=1)")
    subprocess.run([sys.executable, "-c", code, kb.path], check=True, capture_output=True)
    for mode in ("bm25", "dense", "hybrid"):
        assert ranked(kb, "kraken sighted Tulloch Ness relief boat", mode)[0] == "late"
        assert "fenwick-point-light.md" not in ranked(kb, "Who built Fenwick Point Light?", mode, k=10)
    assert kb.check()["ok"]


class Counting(HashEmbedder):
    calls = 0

    def encode(self, texts, show_progress=False):
        Counting.calls += len(texts)
        return super().encode(texts)


def test_moving_a_kb_to_milvus_and_back_re_embeds_nothing(tmp_path, milvus_uri):
    kb = make(tmp_path / "kb")
    kb.ingest([CORPUS])
    kb.config["writeback"]["earn_slot"] = False  # a unit even where the passage already ranks first
    kb.label([{"id": "x", "query": "Who designed the tower at Fenwick Point?", "answers": ["Aldous Penhallow"]}], k=3)
    assert kb.writeback()["written"] == 1
    before = {(q, m): ranked(kb, q, m) for q in QUERIES for m in ("dense", "bm25", "hybrid")}
    kb._embedder = Counting()
    Counting.calls = 0
    out = kb.reindex(backend="milvus", milvus_uri=milvus_uri)
    assert out["backend"] == "milvus" and Counting.calls == 0 and kb.check()["ok"]
    assert not os.path.exists(kb.bm25_path)  # the local files are gone
    again = KnowledgeBase.open(kb.path, notify=lambda m: None)  # the move is in config.toml
    assert again.config["index"]["backend"] == "milvus" and again.config["milvus"]["uri"] == milvus_uri
    for (q, m), want in before.items():
        got = ranked(again, q, m)
        assert got == want if m == "dense" else got[0] == want[0]
    assert any(h.kind == "unit" for h in again.search("Who designed the tower at Fenwick Point?", k=5, log=False).hits)
    name = collection_name(again._identity()["kb_created"])
    assert name in connect(milvus_uri).list_collections()
    again.close()
    assert kb.reindex(backend="embedded")["backend"] == "embedded" and Counting.calls == 0
    assert name not in connect(milvus_uri).list_collections()  # moved back: the collection is dropped
    for (q, m), want in before.items():
        assert ranked(kb, q, m) == want
    assert kb.check()["ok"]


def test_check_finds_a_damaged_collection_and_reindex_repairs_it(tmp_path, milvus_uri):
    kb = make(tmp_path / "kb", milvus_uri)
    kb.ingest([CORPUS])
    assert kb.check()["ok"]
    client, name = connect(milvus_uri), collection_name(kb._identity()["kb_created"])
    client.delete(name, ids=[3, 4])
    rep = kb.check()
    assert not rep["ok"] and "lacks 2 active chunks" in rep["problems"][0] and "reindex" in rep["problems"][0]
    kb.reindex()
    assert kb.check()["ok"]
    client.drop_collection(name)  # lost on the server: rebuilt from the records on next use, with a notice
    notes = []
    k2 = KnowledgeBase.open(kb.path, notify=notes.append)
    assert ranked(k2, "Who built Fenwick Point Light?", "hybrid")[0] == "fenwick-point-light.md"
    assert any("missing from Milvus" in n for n in notes) and k2.check()["ok"]


def test_metadata_too_big_for_the_collection_is_filtered_through_the_records(tmp_path, milvus_uri):
    kb = make(tmp_path / "kb", milvus_uri)
    big = {f"field_{i}": f"{i:03d}" + "v" * 250 for i in range(300)}  # about 80 KB of metadata: over the field
    kb.ingest([{"id": "big", "text": "storm over the harbour", **big},
               {"id": "small", "text": "storm over the hills", "lang": "en"}])
    for mode in ("bm25", "dense", "hybrid"):
        assert ranked(kb, "storm", mode, filters={"field_7": big["field_7"]}) == ["big"]
        assert ranked(kb, "storm", mode, filters={"lang": "en"}) == ["small"]
    assert kb._indexes.expression(kb.records, Filter.parse({"lang": "en"})).startswith("(id in [")
    assert kb.check()["ok"]


def test_a_collection_made_by_an_older_version_is_rebuilt_with_a_notice(tmp_path, milvus_uri, monkeypatch):
    kb = make(tmp_path / "kb", milvus_uri)
    kb.ingest([CORPUS])
    assert ranked(kb, "Who built Fenwick Point Light?", "hybrid")[0] == "fenwick-point-light.md"
    kb.close()
    monkeypatch.setattr(MilvusCollection, "SCHEMA", MilvusCollection.SCHEMA + 1)  # a newer layout than the server's
    notes = []
    k2 = KnowledgeBase.open(tmp_path / "kb", notify=notes.append)
    assert ranked(k2, "Who built Fenwick Point Light?", "hybrid")[0] == "fenwick-point-light.md"
    assert any("made by an older version; rebuilding" in n for n in notes), notes
    assert k2.check()["ok"]
    notes.clear()
    k2.close()
    k3 = KnowledgeBase.open(tmp_path / "kb", notify=notes.append)
    assert ranked(k3, "fog signal", "bm25") and notes == []  # rebuilt once, ours from then on
    k3.close()


def test_a_replay_done_twice_adds_nothing(tmp_path, milvus_uri):
    """As after a kill between the collection's writes and the sequence's: the whole log replayed again."""
    from writeback_rag import store

    kb = make(tmp_path / "kb", milvus_uri)
    kb.ingest([CORPUS])
    kb.delete(["fenwick-point-light.md"])
    assert kb.check()["ok"]
    name = collection_name(kb._identity()["kb_created"])
    connect(milvus_uri).insert(name, [{"id": 1, "kind": "source", "doc_id": "x", "source": "", "terms": "w", "meta": {},
                                       "vector": [1.0] + [0.0] * 255}])  # a row twice: check must see it
    assert "twice" in " ".join(kb.check()["problems"])
    at = kb.reindex()["generation"]
    kb.ingest([{"id": f"n{i}", "text": f"note {i} on gulls"} for i in range(30)])
    kb.delete(["n3"])
    with store.transaction(kb.conn):
        store.set_meta(kb.conn, "milvus_seq", at)  # the tail after the reindex is replayed a second time
    k2 = KnowledgeBase.open(kb.path, notify=lambda m: None)
    rep = k2.check()
    assert rep["ok"] and rep["counts"]["indexed_chunks"] == rep["counts"]["active_chunks"]
    assert "fenwick-point-light.md" not in ranked(k2, "Who built Fenwick Point Light?", "hybrid", k=10)


def test_a_collection_of_something_else_is_refused_never_dropped(tmp_path, milvus_uri):
    client = connect(milvus_uri)
    other = MilvusCollection(client, "someone_elses", 4, make(tmp_path / "x").config, {"owner": "them"})
    other.create()
    kb = KnowledgeBase.create(tmp_path / "kb", embedder="hash", notify=lambda m: None,
                              config={**milvus_cfg(milvus_uri), "milvus": {"uri": milvus_uri, "collection": "someone_elses"}})
    kb.ingest([{"id": "d", "text": "text"}])
    with pytest.raises(WbragError, match="belongs to something else"):
        kb.search("text", log=False)
    assert "someone_elses" in client.list_collections()


def _wbrag(*args):
    return subprocess.run([sys.executable, "-m", "writeback_rag.cli", *args], capture_output=True, text=True)


def test_cli_init_on_milvus_query_and_move_back(tmp_path, milvus_uri):
    kb = str(tmp_path / "kb")
    r = _wbrag("init", "--kb", kb, "--embedder", "hash", "--backend", "milvus", "--milvus-uri", milvus_uri)
    assert r.returncode == 0, r.stderr
    assert _wbrag("ingest", "--kb", kb, CORPUS, "--quiet").returncode == 0
    r = _wbrag("query", "--kb", kb, "Who built Fenwick Point Light?", "--json", "-k", "3")
    assert r.returncode == 0 and json.loads(r.stdout)["hits"][0]["doc_id"] == "fenwick-point-light.md"
    assert _wbrag("check", "--kb", kb).returncode == 0
    r = _wbrag("reindex", "--kb", kb, "--backend", "embedded", "--quiet")
    assert r.returncode == 0 and "backend embedded" in r.stdout
    bad = str(tmp_path / "bad")
    assert _wbrag("init", "--kb", bad, "--embedder", "hash", "--backend", "milvus", "--milvus-uri",
                  "http://127.0.0.1:9").returncode == 0
    r = _wbrag("query", "--kb", bad, "anything", "--mode", "bm25")
    assert r.returncode != 0 and "cannot reach Milvus at http://127.0.0.1:9" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_server_that_goes_away_gives_one_line_and_loses_nothing(tmp_path):
    """Its own server, stopped mid-session: the search fails with a WbragError naming the collection and what
    to do; the records are intact, and with the server back the KB catches up and answers."""
    from writeback_rag.milvus import serve_local

    server, uri = serve_local(tmp_path / "own.db")
    port = int(uri.rsplit(":", 1)[1])
    kb = make(tmp_path / "kb", uri)
    kb.ingest([CORPUS])
    assert ranked(kb, "Who built Fenwick Point Light?", "hybrid")[0] == "fenwick-point-light.md"
    server.stop()
    kb.ingest([{"id": "late", "text": "A kraken was sighted off Tulloch Ness."}])  # the records take it
    with pytest.raises(WbragError, match="Milvus.*(failed|cannot reach)"):
        kb.search("kraken Tulloch Ness", k=3, mode="bm25", log=False)
    kb.close()
    server, _ = serve_local(tmp_path / "own.db", port=port)  # the same address: the KB's setting
    try:
        k2 = KnowledgeBase.open(kb.path, notify=lambda m: None)
        assert ranked(k2, "kraken sighted Tulloch Ness", "bm25")[0] == "late" and k2.check()["ok"]
        k2.close()
    finally:
        server.stop()
