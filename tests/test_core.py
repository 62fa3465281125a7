"""Store, ingest, indexes and search on the fast hash embedder (real SQLite, real FAISS)."""

import json
import os
import threading

import numpy as np
import pytest

from conftest import CORPUS, write
from writeback_rag import KnowledgeBase
from writeback_rag.errors import EmbedderMismatch, InputError, NotAKnowledgeBase
from writeback_rag.backends import HashEmbedder
from writeback_rag.index import BM25
from writeback_rag.text import bm25_tokens, chunk_text, count_tokens, sentences


def index_agrees(kb):
    """Dense and BM25 indexes hold exactly the active chunks of the database: in this process (after
    replaying the change log) and in a new one (loading the saved files and replaying their tail)."""
    rep = kb.check()
    assert rep["ok"], rep
    fresh = KnowledgeBase.open(kb.path, notify=lambda m: None)
    again = fresh.check()
    fresh.close()
    assert again["ok"], again
    assert rep["counts"]["dense_vectors"] == rep["counts"]["bm25_chunks"] == rep["counts"]["active_chunks"]
    return rep["counts"]["active_chunks"]


def test_chunking_respects_budget_and_sentences():
    text = " ".join(f"Sentence number {i} is here." for i in range(100))
    chunks = chunk_text(text, size=40, overlap=10)
    assert len(chunks) > 5
    assert all(count_tokens(c) <= 40 for c in chunks)
    assert all(c.endswith(".") for c in chunks)  # cut on sentence boundaries
    assert chunks[1].split(".")[0] + "." in chunks[0]  # overlap carries the last sentence over
    assert sentences("Dr. Who went home. Then 3 cats came!") == ["Dr. Who went home.", "Then 3 cats came!"]
    long = "word " * 1000  # one sentence far over budget is still cut
    assert max(count_tokens(c) for c in chunk_text(long, 100, 0)) <= 100


def test_create_open_and_not_a_kb(tmp_path, kb):
    assert os.path.exists(os.path.join(kb.path, "kb.sqlite"))
    assert kb.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert kb.conn.execute("PRAGMA user_version").fetchone()[0] >= 2
    with pytest.raises(NotAKnowledgeBase, match="KnowledgeBase.create"):
        KnowledgeBase.open(tmp_path / "nothing")
    with pytest.raises(InputError, match="already exists"):
        KnowledgeBase.create(kb.path, embedder="hash")


def test_migration_from_stored_postings_keeps_term_statistics(corpus_kb):
    """A KB of schema 5 (postings stored in SQLite) opens with its postings turned into per-term
    document frequencies over the active sources, and checks clean."""
    import sqlite3
    from collections import Counter

    from writeback_rag.text import index_text

    kb = corpus_kb
    kb.delete(["fenwick-point-light.md"])
    want = dict(kb.conn.execute("SELECT term, df FROM terms WHERE df > 0").fetchall())
    path = os.path.join(kb.path, "kb.sqlite")
    kb.close()
    c = sqlite3.connect(path)
    c.executescript("CREATE TABLE postings (term_id INTEGER NOT NULL, chunk_id INTEGER NOT NULL, tf INTEGER NOT NULL,"
                    " PRIMARY KEY (term_id, chunk_id)) WITHOUT ROWID; CREATE INDEX postings_chunk ON postings(chunk_id);")
    ids = dict(c.execute("SELECT term, id FROM terms"))
    for cid, text, title in c.execute("SELECT c.id, c.text, d.title FROM chunks c JOIN documents d ON d.id=c.doc_id "
                                      "WHERE d.status='active'").fetchall():
        c.executemany("INSERT INTO postings VALUES (?,?,?)",
                      [(ids[t], cid, n) for t, n in Counter(bm25_tokens(index_text(title, text))).items()])
    c.execute("ALTER TABLE terms DROP COLUMN df")
    c.executescript("DROP TABLE tunings; ALTER TABLE feedback DROP COLUMN relevant;"  # before migrations 7 and 8 too
                    "DROP INDEX units_anchor; DROP INDEX units_ended_by;"
                    "ALTER TABLE units DROP COLUMN anchor; ALTER TABLE units DROP COLUMN ended_by;"
                    "ALTER TABLE units DROP COLUMN revived;"  # and 9
                    "DROP INDEX documents_header;")  # and 10
    c.execute("PRAGMA user_version=5")
    c.commit()
    c.close()
    kb2 = KnowledgeBase.open(kb.path, notify=lambda m: None)
    assert dict(kb2.conn.execute("SELECT term, df FROM terms WHERE df > 0").fetchall()) == want
    assert not kb2.conn.execute("SELECT 1 FROM sqlite_master WHERE name='postings'").fetchone()
    assert kb2.check()["ok"]
    kb2.close()


def test_ingest_folder_formats_and_idempotency(corpus_kb):
    kb = corpus_kb
    st = kb.stats()
    assert st["documents"] == 44 and st["chunks"] >= 44
    html = kb.document("lighthouse-stamps-1993.html")
    assert html["title"] and "<p>" not in html["text"]
    assert "Mondays only" not in kb.document("visiting-the-lights.html")["text"]  # <script> dropped
    assert kb.document("fenwick-point-light.md")["title"] == "Fenwick Point Light"
    again = kb.ingest([CORPUS])
    assert (again.added, again.updated, again.unchanged) == (0, 0, 44)
    assert index_agrees(kb) == st["chunks"]


def test_small_write_batches_give_the_same_kb(corpus_kb, tmp_path):
    """Batch size is a speed setting only: many small transactions store and rank exactly as one."""
    small = KnowledgeBase.create(tmp_path / "small", embedder="hash", notify=lambda m: None)
    rep = small.ingest([CORPUS], batch_chunks=5)
    assert rep.added == 44 and small.stats()["chunks"] == corpus_kb.stats()["chunks"]
    assert index_agrees(small) == rep.chunks
    for mode in ("bm25", "dense", "hybrid"):
        for q in ("Who built Fenwick Point Light?", "lighthouse stamps"):
            a = [(h.doc_id, round(h.score, 6)) for h in corpus_kb.search(q, k=5, mode=mode, log=False).hits]
            b = [(h.doc_id, round(h.score, 6)) for h in small.search(q, k=5, mode=mode, log=False).hits]
            assert a == b
    small.close()


def test_commits_by_size_or_time(tmp_path):
    """Each write transaction bumps the generation once: count them for size- and time-bound commits. The
    first commit holds 256 chunks (the embedder's speed is not known yet), later ones what the embedder does
    in commit_seconds, at most batch_chunks."""
    docs = [{"id": f"d{i}", "text": f"word{i} shared text"} for i in range(600)]
    for batch, seconds, commits in ((10**6, 1e9, 2), (10**6, 0.0, 3), (300, 1e9, 3), (100, 1e9, 6)):
        kb = KnowledgeBase.create(tmp_path / f"kb{batch}-{seconds}", embedder="hash", notify=lambda m: None)
        rep = kb.ingest(docs, batch_chunks=batch, commit_seconds=seconds)
        assert (rep.added, kb.generation, index_agrees(kb)) == (600, commits, 600)
        kb.close()


def test_changed_document_replaces_chunks_everywhere(kb, tmp_path):
    d = tmp_path / "docs"
    write(d / "a.txt", "Alpha\n\nThe zebra lives in the savanna.")
    write(d / "b.txt", "Beta\n\nThe penguin lives on ice.")
    kb.ingest([str(d)])
    assert kb.search("zebra", mode="bm25", log=False).hits[0].doc_id == "a.txt"
    write(d / "a.txt", "Alpha\n\nThe okapi lives in the forest.")
    rep = kb.ingest([str(d)])
    assert (rep.added, rep.updated, rep.unchanged) == (0, 1, 1)
    assert kb.search("zebra", mode="bm25", log=False).hits == []
    assert kb.search("okapi", mode="bm25", log=False).hits[0].doc_id == "a.txt"
    assert kb.conn.execute("SELECT COUNT(*) FROM chunks WHERE doc_id='a.txt'").fetchone()[0] == 1
    assert kb.delete(["a.txt", "missing"]) == 1
    assert kb.search("okapi", mode="dense", log=False).hits[0].doc_id == "b.txt"
    assert index_agrees(kb) == 1


def test_json_jsonl_csv_stdin_and_fields(kb, tmp_path):
    import io

    write(tmp_path / "c.jsonl", json.dumps({"_id": "d1", "title": "T1", "text": "kiwi fruit", "lang": "en"}) + "\n")
    write(tmp_path / "r.json", json.dumps([{"id": "d2", "text": "mango tree"}]))
    write(tmp_path / "t.csv", "id,title,text,src\nd3,T3,papaya seeds,x\n")
    write(tmp_path / "f.jsonl", json.dumps({"key": "d4", "body": "lychee shell"}) + "\n")
    rep = kb.ingest([str(tmp_path / "c.jsonl"), str(tmp_path / "r.json"), str(tmp_path / "t.csv")])
    assert rep.added == 3 and not rep.skipped
    rep = kb.ingest([str(tmp_path / "f.jsonl")], fields={"id_field": "key", "text_field": "body"})
    assert rep.added == 1
    rep = kb.ingest(["-"], stdin=io.StringIO(json.dumps({"id": "d5", "text": "guava juice"}) + "\n"))
    assert rep.added == 1
    assert kb.document("d1")["meta"] == {"lang": "en"}
    hits = kb.search("kiwi mango papaya lychee guava", k=10, mode="bm25", filters={"lang": "en"}, log=False).hits
    assert [h.doc_id for h in hits] == ["d1"]
    hits = kb.search("kiwi mango papaya", k=10, mode="hybrid", filters={"source": "*.csv"}, log=False).hits
    assert [h.doc_id for h in hits] == ["d3"]


@pytest.mark.parametrize("name,content,match,encoding", [
    ("bad.txt", b"ok\ncaf\xe9 au lait\n", "line 2: not valid utf-8", "utf-8"),
    ("bin.txt", b"\x00\x01\x02binary", "binary", None),
    ("bad.jsonl", b'{"id": "x", "text": "ok"}\n{"id": oops}\n', "line 2: malformed JSON", None),
    ("notext.jsonl", b'{"id": "x", "words": "no text here"}\n', "no text field", None),
    ("noid.json", b'[{"text": "no id"}]', "no id field", None),
    ("any.txt", b"text", "unknown encoding 'klingon'", "klingon"),
])
def test_bad_files_are_rejected_whole_with_location(kb, tmp_path, name, content, match, encoding):
    kb.ingest([{"id": "keep", "text": "already stored"}])
    path = write(tmp_path / name, content, "wb")
    rep = kb.ingest([path], encoding=encoding)
    assert rep.added == 0 and len(rep.errors) == 1
    assert name in str(rep.errors[0]) and match in str(rep.errors[0])
    assert kb.stats()["documents"] == 1 and kb.document("x") is None  # nothing half-written, nothing lost


def test_encodings_detected_or_given(kb, tmp_path):
    """UTF-8, a UTF-16 BOM, and 8-bit Western text (Latin-1 / Windows-1252) without being told; or as given."""
    write(tmp_path / "docs" / "utf8.txt", "Café du Phare\n\nLe gardien allumait la lampe.".encode("utf-8"), "wb")
    write(tmp_path / "docs" / "latin1.txt", "Café du Port\n\nLa lampe à pétrole brûlait.".encode("latin-1"), "wb")
    write(tmp_path / "docs" / "cp1252.txt", "Quotes\n\nThe keeper said \u201cfog\u201d \u2013 twice.".encode("cp1252"), "wb")
    write(tmp_path / "docs" / "utf16.txt", "Phare\n\nLumière blanche.".encode("utf-16"), "wb")
    rep = kb.ingest([str(tmp_path / "docs")])
    assert rep.added == 4 and not rep.skipped
    assert kb.document("latin1.txt")["title"] == "Café du Port" and "brûlait" in kb.document("latin1.txt")["text"]
    assert "\u201cfog\u201d \u2013" in kb.document("cp1252.txt")["text"]
    assert kb.document("utf16.txt")["text"] == "Lumière blanche."
    ko = write(tmp_path / "koi8" / "r.txt", "Маяк\n\nСвет.".encode("koi8-r"), "wb")
    kb.ingest([ko], encoding="koi8-r")
    assert kb.document("r.txt")["title"] == "Маяк"


def test_empty_duplicate_missing_and_unsupported(kb, tmp_path):
    write(tmp_path / "d" / "empty.md", "   \n")
    write(tmp_path / "d" / "dup.jsonl", '{"id": "same", "text": "one"}\n{"id": "same", "text": "two"}\n')
    write(tmp_path / "d" / "image.png", "x")
    rep = kb.ingest([str(tmp_path / "d"), str(tmp_path / "missing")])
    reasons = [str(p) for p in rep.skipped]
    assert any("empty file" in r for r in reasons)
    assert any("duplicate id 'same'" in r for r in reasons)
    assert any("unsupported file type '.png'" in r for r in reasons)
    assert any("missing: no such file" in r for r in reasons)
    assert rep.added == 1
    write(tmp_path / "e" / "x.png", "x")
    rep = kb.ingest([str(tmp_path / "e")])
    assert any("no supported files" in str(p) for p in rep.errors)


def test_huge_document_and_size_limit(kb, tmp_path):
    big = " ".join(f"Line {i} mentions the rare word quokka{i % 50}." for i in range(40000))
    path = write(tmp_path / "big.txt", "Big\n\n" + big)
    rep = kb.ingest([path])
    assert rep.added == 1 and rep.chunks > 100
    assert kb.search("quokka7", mode="bm25", log=False).hits[0].doc_id == "big.txt"
    kb.config["ingest"]["max_doc_mb"] = 0.1
    write(tmp_path / "big2.txt", "Big\n\n" + big)
    rep = kb.ingest([str(tmp_path / "big2.txt")])
    assert rep.added == 0 and "over the 0 MB limit" in str(rep.errors[0])


def test_embedder_mismatch_refused(kb):
    kb.ingest([{"id": "a", "text": "hello world"}])
    kb.close()
    with pytest.raises(EmbedderMismatch, match="reindex"):
        KnowledgeBase.open(kb.path, embedder="minilm")


def test_flat_dense_index_is_built_from_the_stored_vectors_and_keeps_no_file(corpus_kb):
    """Vectors are kept once, in the store: a flat index has no file, and one left by an older version
    is removed (it would be a second copy of every vector)."""
    kb = corpus_kb
    kb.search("Grey Heron lens", mode="dense", log=False)
    assert not os.path.exists(kb.dense_path)
    write(kb.dense_path, "an old copy")
    write(kb.dense_path + ".manifest.json", "{}")
    kb2 = KnowledgeBase.open(kb.path, notify=lambda m: None)
    assert kb2.search("Grey Heron lens", k=1, mode="dense", log=False).hits
    assert not os.path.exists(kb.dense_path) and not os.path.exists(kb.dense_path + ".manifest.json")
    assert index_agrees(kb2) >= 44 and kb2.check()["ok"]
    kb2.close()


@pytest.mark.parametrize("damage", ["truncate", "delete", "other-kb"])
def test_dense_index_missing_corrupt_or_foreign_is_rebuilt(tmp_path, damage):
    kb = KnowledgeBase.create(tmp_path / "kb", embedder="hash", config={"dense": {"index": "hnsw"}},
                              notify=lambda m: None)
    kb.ingest([CORPUS])
    kb.search("Grey Heron lens", mode="dense", log=False)
    kb.close()
    path = kb.dense_path
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(100)
    elif damage == "delete":
        os.remove(path)
    else:  # a file copied from another KB
        m = json.load(open(path + ".manifest.json"))
        m["kb_created"] = "0"
        json.dump(m, open(path + ".manifest.json", "w"))
    notes = []
    kb2 = KnowledgeBase.open(kb.path, notify=notes.append)
    res = kb2.search("Grey Heron lens", mode="dense", log=False)
    assert res.hits and (damage == "delete" or (notes and "rebuilding" in notes[0]))
    assert index_agrees(kb2) >= 44


def _bm25_hits(kb, queries=("Fenwick Point keeper", "lighthouse stamps 1993", "Grey Heron lens")):
    return [[(h.chunk_id, round(h.score, 5)) for h in kb.search(q, k=10, mode="bm25", log=False).hits]
            for q in queries]


def _engine_hits(kb, k1=1.2, queries=("Fenwick Point keeper", "lighthouse stamps 1993", "Grey Heron lens")):
    """The same queries on an engine built from scratch from the store (what a replay must equal)."""
    engine = BM25(kb.records, k1, 0.75)
    return [[(int(i), round(float(s), 5)) for i, s in zip(*engine.search(q, 10))] for q in queries]


def test_bm25_arrays_saved_and_replayed_by_the_next_process(corpus_kb, monkeypatch, tmp_path):
    """A new process loads the saved arrays and replays the change log's tail: no SQL load after a write,
    and scores equal to an engine built from scratch."""
    kb = corpus_kb
    want = _bm25_hits(kb)
    assert want == _engine_hits(kb)
    manifest = json.load(open(kb.bm25_path + ".manifest.json"))
    assert manifest["seq"] == kb.generation and manifest["n_docs"] == kb.stats()["chunks"]

    loads = []
    real = BM25.build
    monkeypatch.setattr(BM25, "build", lambda self, conn: (loads.append(1), real(self, conn))[1])
    kb2 = KnowledgeBase.open(kb.path)
    assert _bm25_hits(kb2) == want and loads == []  # loaded from the file

    kb2.ingest([{"id": "new", "text": "The Fenwick Point keeper kept a logbook of stamps."}])
    kb2.delete(["grey-heron-light.md"])
    kb3 = KnowledgeBase.open(kb.path)
    hits = kb3.search("Fenwick Point keeper logbook", k=3, mode="bm25", log=False).hits
    assert hits[0].doc_id == "new" and loads == []  # the file plus two replayed changes: no SQL load
    assert _bm25_hits(kb3) == _engine_hits(kb3) and _bm25_hits(kb2) == _bm25_hits(kb3)
    assert len(loads) == 1  # the reference engine above
    del loads[:]

    with open(kb3.bm25_path, "r+b") as f:  # a torn file is never used
        f.truncate(200)
    assert _bm25_hits(KnowledgeBase.open(kb.path)) == _bm25_hits(kb3) and loads == [1]

    # arrays of one save under the manifest of another (two processes saving at once) are refused
    m = json.load(open(kb3.bm25_path + ".manifest.json"))
    m["n_docs"] += 1
    json.dump(m, open(kb3.bm25_path + ".manifest.json", "w"))
    assert _bm25_hits(KnowledgeBase.open(kb.path)) == _bm25_hits(kb3) and loads == [1, 1]

    other = KnowledgeBase.open(kb.path)  # other BM25 parameters apply at query time: no reload
    _bm25_hits(other)
    n = len(loads)
    other.config["bm25"]["k1"] = 2.0
    assert _bm25_hits(other) != _bm25_hits(kb3) and len(loads) == n
    assert _bm25_hits(other) == _engine_hits(other, k1=2.0)

    clone = tmp_path / "clone"  # arrays copied next to another KB are refused
    other_kb = KnowledgeBase.create(clone, embedder="hash", notify=lambda m: None)
    other_kb.ingest([{"id": f"x{i}", "text": "unrelated words here"} for i in range(3)])
    other_kb.close()
    for suffix in ("", ".manifest.json"):
        with open(kb3.bm25_path + suffix, "rb") as src, open(other_kb.bm25_path + suffix, "wb") as dst:
            dst.write(src.read())
    assert not KnowledgeBase.open(clone).search("Fenwick keeper", mode="bm25", log=False).hits


def test_saves_remove_temp_files_left_by_killed_saves(corpus_kb):
    old, fresh = corpus_kb.bm25_path + ".111.1.tmp", corpus_kb.bm25_path + ".222.2.tmp"
    for p in (old, fresh):
        write(p, "partial")
    os.utime(old, (1, 1))
    os.remove(corpus_kb.bm25_path)
    kb = KnowledgeBase.open(corpus_kb.path, notify=lambda m: None)
    kb.search("one more", mode="bm25", log=False)  # loads from SQLite and saves bm25.npz
    assert not os.path.exists(old) and os.path.exists(fresh) and os.path.exists(corpus_kb.bm25_path)


def test_bm25_scores_equal_rank_bm25(kb):
    rank_bm25 = pytest.importorskip("rank_bm25")
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(60)]
    docs = [" ".join(rng.choice(vocab, size=rng.integers(3, 30), p=None)) for _ in range(80)]
    kb.ingest([{"id": f"d{i}", "text": t} for i, t in enumerate(docs)])
    ref = rank_bm25.BM25Okapi([bm25_tokens(t) for t in docs], k1=1.2, b=0.75)
    engine = BM25(kb.records, 1.2, 0.75)
    for q in ["w1 w2 w3", "w5 w5 w40", "w59"]:
        ids, scores = engine.search(q, 80)
        got = {kb.conn.execute("SELECT doc_id FROM chunks WHERE id=?", (int(i),)).fetchone()[0]: s
               for i, s in zip(ids, scores)}
        want = ref.get_scores(bm25_tokens(q))
        for i, s in enumerate(want):
            assert got.get(f"d{i}", 0.0) == pytest.approx(s, rel=1e-4, abs=1e-5)


def test_bm25_scores_stay_equal_to_rank_bm25_across_writes(kb):
    """The engine weighs postings once and keeps the weights: writes that move the average length past
    its drift, appended postings and tombstones must still give rank-bm25's scores through kb.search."""
    rank_bm25 = pytest.importorskip("rank_bm25")
    rng = np.random.default_rng(1)
    vocab = [f"w{i}" for i in range(50)]
    short = {f"s{i}": " ".join(rng.choice(vocab, size=rng.integers(3, 12))) for i in range(40)}
    long = {f"l{i}": " ".join(rng.choice(vocab, size=rng.integers(40, 80))) for i in range(15)}
    now = {}

    def agrees(rel=1e-4):
        ids = sorted(now)
        ref = rank_bm25.BM25Okapi([bm25_tokens(now[i]) for i in ids], k1=1.2, b=0.75)
        for q in ["w1 w2 w3", "w7 w7 w30", "w49"]:
            got = {h.doc_id: h.bm25 for h in kb.search(q, k=len(ids), mode="bm25", log=False).hits}
            for i, s in zip(ids, ref.get_scores(bm25_tokens(q))):
                assert got.get(i, 0.0) == pytest.approx(s, rel=rel, abs=1e-5), (q, i)

    for batch in (short, long):  # the long documents move the average length by far more than the drift
        kb.ingest([{"id": i, "text": t} for i, t in batch.items()])
        now.update(batch)
        agrees()
    gone = [h.doc_id for h in kb.search("w7 w7 w30", k=5, mode="bm25", log=False).hits] + ["s1", "s2"]
    kb.delete(gone)  # tombstones until the next compaction
    for i in gone:
        del now[i]
    agrees()
    hits = kb.search("w7 w7 w30", k=5, mode="bm25", log=False).hits  # the removed best are not in the way
    assert len(hits) == 5 and not {h.doc_id for h in hits} & set(gone)
    # one-document writes to the same terms, searched in between: appended postings' weights are kept
    # between queries and must be made again when a write appends to their term. Each document has the
    # average length, so the average stays within its drift and no refresh of every weight hides a stale one
    # (the scores are then those of an average length within 0.1%: rank-bm25's to 1e-3)
    for j in range(3):
        avg = round(sum(len(bm25_tokens(t)) for t in now.values()) / len(now))
        now[f"a{j}"] = " ".join(["w1", "w2", "w3"] + ["w20"] * (avg - 3))
        kb.ingest([{"id": f"a{j}", "text": now[f"a{j}"]}])
        agrees(rel=1e-3)


def test_a_changed_title_shows_in_the_next_search_in_every_process(kb):
    """Hits take titles from a cache kept for the log's head: a write here or in another process must show."""
    kb.ingest([{"id": "a", "title": "Old title", "text": "alpha bravo charlie"}])
    assert kb.search("alpha", mode="bm25", log=False).hits[0].title == "Old title"
    kb.ingest([{"id": "a", "title": "New title", "text": "alpha bravo charlie"}])
    assert kb.search("alpha", mode="bm25", log=False).hits[0].title == "New title"
    other = KnowledgeBase.open(kb.path, notify=lambda m: None)
    other.ingest([{"id": "a", "title": "Third title", "text": "alpha bravo charlie", "metadata": {"page": 3}}])
    other.close()
    hit = kb.search("alpha", mode="bm25", log=False).hits[0]
    assert (hit.title, hit.meta) == ("Third title", {"page": 3})
    hit.meta["page"] = 4  # a caller's change to a hit stays in that hit
    assert kb.search("alpha", mode="bm25", log=False).hits[0].meta == {"page": 3}


def test_search_modes_fusion_and_hits(corpus_kb):
    kb = corpus_kb
    for mode in ("bm25", "dense", "hybrid"):
        res = kb.search("Who designed Fenwick Point Light?", k=4, mode=mode)
        assert len(res.hits) == 4 and [h.rank for h in res.hits] == [1, 2, 3, 4]
        assert all(h.kind == "source" and h.text for h in res.hits)
    h = kb.search("Who designed Fenwick Point Light?", k=3, mode="hybrid", log=False).hits[0]
    assert h.bm25 is not None and h.dense is not None and h.score == pytest.approx(
        sum(1 / (60 + r) for r in (1, 1)), rel=0.2)
    w = kb.search("Fenwick Point", k=3, fusion="weighted", log=False)
    assert 0 < w.hits[0].score <= 1.0
    with pytest.raises(InputError):
        kb.search("x", mode="nope")
    with pytest.raises(InputError):
        kb.search("   ")


def test_query_log_records_everything(corpus_kb):
    kb = corpus_kb
    res = kb.search("fog signal", k=3, mode="bm25")
    assert kb.search("fog signal", log=False).query_id is None
    rec = kb.query_record(res.query_id)
    assert rec["text"] == "fog signal" and rec["mode"] == "bm25" and rec["k"] == 3 and rec["latency_ms"] > 0
    assert [h["doc_id"] for h in rec["hits"]] == [h.doc_id for h in res.hits]
    assert rec["hits"][0]["bm25"] == pytest.approx(res.hits[0].bm25)
    assert len(kb.queries(last=10)) == 1


def test_concurrent_readers_in_threads(corpus_kb):
    kb = corpus_kb
    errors, results = [], []

    def worker(i):
        try:
            for _ in range(5):
                results.append(kb.search(f"lighthouse keeper {i}", k=3).hits[0].doc_id)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(results) == 30
    assert kb.stats()["queries"] == 30


def test_hnsw_option(tmp_path):
    kb = KnowledgeBase.create(tmp_path / "h", embedder="hash", config={"dense": {"index": "hnsw"}}, notify=lambda m: None)
    kb.ingest([CORPUS])
    assert kb.search("Grey Heron", mode="dense", log=False).hits
    kb.delete(["grey-heron-light.md"])  # HNSW cannot remove: rebuilt from stored embeddings
    assert all(h.doc_id != "grey-heron-light.md" for h in kb.search("Grey Heron", k=10, mode="dense", log=False).hits)
    assert index_agrees(kb) == 43
    manifest = json.load(open(kb.dense_path + ".manifest.json"))
    assert manifest["kind"] == "hnsw" and manifest["dim"] == 256 and manifest["model_id"] == "hash-256"


def test_reindex_without_reembedding(corpus_kb):
    kb = corpus_kb
    before = kb.search("Corran Head siren", k=3, log=False).hits
    os.remove(kb.bm25_path)
    out = kb.reindex()
    assert out["chunks"] == kb.stats()["chunks"]
    assert [h.doc_id for h in kb.search("Corran Head siren", k=3, log=False).hits] == [h.doc_id for h in before]


def test_unreadable_file_is_reported(kb, tmp_path, monkeypatch):
    import builtins

    path = write(tmp_path / "secret.txt", "Secret\n\nhidden text")
    real_open = builtins.open

    def guarded(p, *a, **k):  # root ignores file modes, so refuse the read the way the OS would
        if str(p) == path:
            raise PermissionError(13, "Permission denied")
        return real_open(p, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded)
    rep = kb.ingest([path])
    assert rep.added == 0 and "secret.txt: cannot read (Permission denied)" in str(rep.errors[0])


def test_a_commit_is_embedded_in_one_length_order_and_each_vector_lands_on_its_chunk(tmp_path):
    """Within one commit the chunks are sorted by length once (groups of similar length pad less), and the
    vectors still go back to their own chunks and the documents are written in arrival order."""
    import random

    calls = []

    class Recording(HashEmbedder):
        def encode(self, texts, show_progress=False):
            calls.append([len(t) for t in texts])
            return super().encode(texts)

    rng = random.Random(7)
    docs = [{"id": f"d{i:03d}", "text": f"token{i} " + "filler " * rng.randrange(1, 60)} for i in range(600)]
    kb = KnowledgeBase.create(tmp_path / "kb", embedder="hash", notify=lambda m: None)
    kb._embedder = Recording()
    rep = kb.ingest(docs, commit_seconds=1e9)
    assert rep.added == 600 and [len(c) for c in calls] == [256, 256, 88]  # commits of 256 then 344 chunks
    assert all(a <= b for c in calls for a, b in zip(c, c[1:]))
    assert max(calls[1]) <= min(calls[2])  # one sort over the whole commit, not per group
    for i in (0, 137, 599):
        assert kb.search(docs[i]["text"], k=1, mode="dense", log=False).hits[0].doc_id == f"d{i:03d}"
    ids = [r[0] for r in kb.conn.execute("SELECT d.id FROM chunks c JOIN documents d ON d.id=c.doc_id ORDER BY c.id")]
    assert ids == sorted(ids)  # written in arrival order: chunk ids do not depend on the commit size
    assert kb.check()["ok"]
    kb.close()
