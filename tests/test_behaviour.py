"""Exact behaviour of fusion, filters, unit merging, feedback and BM25 through the public API: each test
here fails for a one-line change that the rest of the suite once let through (issue: mutation survivors)."""

import math

import pytest

from conftest import CORPUS, QUESTIONS
from writeback_rag import KnowledgeBase
from writeback_rag.kb import fuse
from writeback_rag.text import bm25_tokens
from writeback_rag.writeback import list_units

BACKENDS = ["embedded", "milvus"]  # tests that build a KB run on both (conftest.pytest_generate_tests)

Q = "Who designed Fenwick Point Light?"


def test_rrf_scores_exactly():
    got = fuse({1: 5.0, 2: 3.0}, {2: 0.9, 3: 0.5}, "hybrid", "rrf", rrf_k=60)
    assert got == pytest.approx({1: 1 / 61, 2: 1 / 62 + 1 / 61, 3: 1 / 62}, rel=1e-12)
    assert fuse({7: 1.0}, {7: 1.0}, "hybrid", "rrf", rrf_k=10)[7] == pytest.approx(2 / 11, rel=1e-12)


def test_weighted_fusion_uses_dense_weight_for_dense():
    got = fuse({1: 5.0, 2: 3.0}, {2: 0.9, 3: 0.5}, "hybrid", "weighted", dense_weight=0.8)
    # min-max per list: bm25 1 -> 1, 2 -> 0; dense 2 -> 1, 3 -> 0
    assert got == pytest.approx({1: 0.2, 2: 0.8, 3: 0.0}, abs=1e-12)


@pytest.mark.parametrize("fusion", ["rrf", "weighted"])
def test_hybrid_search_scores_are_the_fusion_of_the_two_lists(corpus_kb, fusion):
    """Every hybrid hit's score, recomputed from the bm25 and dense lists the search itself returns."""
    kb = corpus_kb
    n = kb.config["retrieval"]["candidates"]
    bm = {h.chunk_id: h.bm25 for h in kb.search(Q, k=n, mode="bm25", log=False).hits}
    dn = {h.chunk_id: h.dense for h in kb.search(Q, k=n, mode="dense", log=False).hits}
    res = kb.search(Q, k=5, mode="hybrid", fusion=fusion, log=False)
    assert len(res.hits) == 5
    for h in res.hits:
        if fusion == "rrf":
            want = sum(1 / (60 + r) for s in (bm, dn) for r, c in
                       enumerate(sorted(s, key=lambda c: (-s[c], c)), 1) if c == h.chunk_id)
        else:
            want = 0.0
            for s, w in ((bm, 0.5), (dn, 0.5)):
                if h.chunk_id in s:
                    lo, hi = min(s.values()), max(s.values())
                    want += w * (s[h.chunk_id] - lo) / (hi - lo)
        assert h.score == pytest.approx(want, rel=1e-6), h


def test_rrf_top_hit_in_both_lists_scores_two_over_61(corpus_kb):
    h = corpus_kb.search(Q, k=3, mode="hybrid", log=False).hits[0]
    assert h.doc_id == "fenwick-point-light.md"
    bm1 = corpus_kb.search(Q, k=1, mode="bm25", log=False).hits[0]
    dn1 = corpus_kb.search(Q, k=1, mode="dense", log=False).hits[0]
    assert bm1.chunk_id == dn1.chunk_id == h.chunk_id  # the fixture's premise, so the check below always runs
    assert h.score == pytest.approx(2 / 61, rel=1e-12)


@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
def test_doc_filter_excludes_every_other_document(corpus_kb, mode):
    kb = corpus_kb
    assert {h.doc_id for h in kb.search(Q, k=10, mode=mode, log=False).hits} != {"fenwick-point-light.md"}
    hits = kb.search(Q, k=10, mode=mode, filters={"doc": "fenwick-point-light.md"}, log=False).hits
    assert hits and {h.doc_id for h in hits} == {"fenwick-point-light.md"}
    globbed = kb.search("light", k=20, mode=mode, filters={"doc": "c*"}, log=False).hits
    assert globbed and all(h.doc_id.startswith("c") for h in globbed)
    assert kb.search(Q, k=5, mode=mode, filters={"doc": "no-such-doc"}, log=False).hits == []


@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
def test_source_and_metadata_filters_in_every_mode(kb, mode):
    kb.ingest([{"id": "a", "text": "The keeper lit the lamp at dusk.", "source": "logs/1901.txt", "lang": "en"},
               {"id": "b", "text": "The keeper lit the lamp at dawn.", "source": "logs/1902.txt", "lang": "fr"},
               {"id": "c", "text": "The keeper trimmed the lamp wick.", "source": "notes/c.md", "lang": "en"}])
    q = "keeper lamp"
    assert {h.doc_id for h in kb.search(q, k=5, mode=mode, log=False).hits} == {"a", "b", "c"}
    assert {h.doc_id for h in kb.search(q, k=5, mode=mode, filters={"source": "logs/"}, log=False).hits} == {"a", "b"}
    assert {h.doc_id for h in kb.search(q, k=5, mode=mode, filters={"source": "*.md"}, log=False).hits} == {"c"}
    assert {h.doc_id for h in kb.search(q, k=5, mode=mode, filters={"lang": "en"}, log=False).hits} == {"a", "c"}
    both = kb.search(q, k=5, mode=mode, filters={"lang": "en", "source": "logs/"}, log=False).hits
    assert [h.doc_id for h in both] == ["a"]
    assert kb.search(q, k=5, mode=mode, filters={"kind": "unit", "lang": "en"}, log=False).hits == []


@pytest.fixture
def unit_kb(corpus_kb):
    kb = corpus_kb
    kb.label(QUESTIONS, split="train")
    out = kb.writeback()
    assert out["written"] > 5
    return kb


@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
def test_kind_filter_keeps_only_that_kind(unit_kb, mode):
    kb = unit_kb
    q = "When was the fog siren at Corran Head installed?"
    mixed = kb.search(q, k=10, mode=mode, log=False, max_units=-1).hits
    assert {h.kind for h in mixed} == {"unit", "source"}
    units = kb.search(q, k=10, mode=mode, filters={"kind": "unit"}, log=False, max_units=-1).hits
    assert units and {h.kind for h in units} == {"unit"}
    sources = kb.search(q, k=10, mode=mode, filters={"kind": "source"}, log=False).hits
    assert sources and {h.kind for h in sources} == {"source"}


def test_a_paraphrase_extends_the_passage_unit_instead_of_adding_one(kb):
    kb.ingest([CORPUS])
    kb.config["writeback"]["earn_slot"] = False  # a unit even where the passage already ranks first
    first, second = "Who designed Fenwick Point Light?", "Fenwick Point Light was designed by whom?"
    for q in (first, second):
        kb.label([{"id": q, "query": q, "answers": ["Aldous Penhallow"]}])
        out = kb.writeback()
        if q == first:
            assert out["written"] == 1 and out["merged"] == 0
    assert out["written"] == 1 and out["merged"] == 1 and len(out["units"][0]["supersedes"]) == 1
    units = [u for u in list_units(kb) if u["status"] == "active"]
    assert len(units) == 1 and len(units[0]["query_ids"]) == 2
    assert first in units[0]["title"] and second in units[0]["title"]


def _unit_hit(kb):
    for _ in range(3):
        res = kb.search("Who designed Fenwick Point Light?", k=5, mode="bm25")
        units = [h for h in res.hits if h.kind == "unit"]
        if units:
            return res, units[0]
    raise AssertionError("no unit among the hits")


@pytest.fixture
def fenwick_unit_kb(kb):
    kb.ingest([CORPUS])
    kb.config["writeback"]["earn_slot"] = False  # a unit even where the passage already ranks first
    kb.label([{"id": "1", "query": "Who designed Fenwick Point Light?", "answers": ["Aldous Penhallow"]}])
    assert kb.writeback()["written"] == 1
    return kb


def test_label_feedback_never_counts_against_units(fenwick_unit_kb):
    kb = fenwick_unit_kb
    res, unit = _unit_hit(kb)
    kb.feedback(res.query_id, correct=False, source="label")
    assert kb.document(unit.doc_id)["status"] == "active"
    kb.feedback(res.query_id, correct=False, source="user")  # retire_after_wrong = 1
    assert kb.document(unit.doc_id)["status"] == "retired"
    assert all(h.kind == "source" for h in kb.search("Who designed Fenwick Point Light?", k=5, log=False).hits)


def test_bm25_idf_floor_for_terms_in_most_documents(kb, backend):
    """rank-bm25's epsilon floor: a term in more than half the documents would get a negative IDF;
    it gets epsilon (0.25) times the mean IDF instead, so matching it still raises a score."""
    if backend == "milvus":
        pytest.skip("Milvus scores with Lucene's IDF (never negative, no floor), not rank-bm25's")
    docs = {"a": "lamp oil", "b": "lamp fog", "c": "lamp wick", "d": "tower"}
    kb.ingest([{"id": i, "text": t} for i, t in docs.items()])
    n = len(docs)
    df = {"lamp": 3, "oil": 1, "fog": 1, "wick": 1, "tower": 1}
    raw = {t: math.log(n - d + 0.5) - math.log(d + 0.5) for t, d in df.items()}
    mean = sum(raw.values()) / len(raw)
    idf_lamp = 0.25 * mean
    assert raw["lamp"] < 0 < idf_lamp
    hits = kb.search("lamp", k=4, mode="bm25", log=False).hits
    assert {h.doc_id for h in hits} == {"a", "b", "c"}
    avgdl = sum(len(bm25_tokens(t)) for t in docs.values()) / n
    k1, b = 1.2, 0.75
    want = idf_lamp * (k1 + 1) / (1 + k1 * (1 - b + b * 2 / avgdl))
    for h in hits:
        assert h.score == pytest.approx(want, rel=1e-5)
    # the rarer term outranks the floored one
    assert kb.search("lamp oil", k=1, mode="bm25", log=False).hits[0].doc_id == "a"


def test_bm25_k1_and_b_come_from_config(tmp_path):
    kb = KnowledgeBase.create(tmp_path / "kb", embedder="hash", config={"bm25": {"k1": 2.0, "b": 0.0}},
                              notify=lambda m: None)
    kb.ingest([{"id": "a", "text": "fog fog horn"}, {"id": "b", "text": "lamp"}, {"id": "c", "text": "tower"}])
    idf = math.log(3 - 1 + 0.5) - math.log(1 + 0.5)
    want = idf * 2 * 3.0 / (2 + 2.0)  # tf 2, b = 0: no length normalisation
    assert kb.search("fog", k=1, mode="bm25", log=False).hits[0].score == pytest.approx(want, rel=1e-5)
    kb.close()


@pytest.mark.parametrize("mode", ["bm25", "hybrid"])
def test_filters_never_bring_in_chunks_that_match_no_query_term(corpus_kb, mode):
    kb = corpus_kb
    hits = kb.search("Fenwick", k=50, mode=mode, filters={"source": "*.md"}, log=False).hits
    bm = [h for h in hits if h.bm25 is not None]
    assert bm and all("fenwick" in (h.title + " " + h.text).lower() for h in bm)
    everything = kb.search("Fenwick", k=50, mode="bm25", log=False).hits
    assert {h.chunk_id for h in bm} <= {h.chunk_id for h in everything}


def test_hnsw_search_with_filters(tmp_path):
    kb = KnowledgeBase.create(tmp_path / "kb", embedder="hash", config={"dense": {"index": "hnsw"}},
                              notify=lambda m: None)
    kb.ingest([CORPUS])
    hits = kb.search(Q, k=5, mode="dense", filters={"doc": "fenwick-point-light.md"}, log=False).hits
    assert hits and {h.doc_id for h in hits} == {"fenwick-point-light.md"}
    assert kb.search(Q, k=3, mode="dense", log=False).hits[0].doc_id == "fenwick-point-light.md"
    kb.close()


@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
@pytest.mark.parametrize("unit_fusion", ["joint", "separate"])
def test_units_never_leave_fewer_than_k_hits(unit_kb, mode, unit_fusion):
    """Units beyond max_units are dropped; the search then looks deeper so that k hits still come back."""
    kb = unit_kb
    kb.config["retrieval"]["unit_fusion"] = unit_fusion
    n_sources = kb.stats()["chunks"]
    for q in ("When was the fog siren at Corran Head installed?", "Who designed Fenwick Point Light?",
              "lighthouse keeper"):
        for k in (1, 3, 5, 20):
            hits = kb.search(q, k=k, mode=mode, log=False).hits
            want = k if mode != "bm25" else min(k, len(kb.search(q, k=1000, mode=mode, log=False).hits))
            assert len(hits) == want, (q, k, [h.kind for h in hits])
            assert sum(h.kind == "unit" for h in hits) <= 1
    assert n_sources > 20


def test_bm25_term_in_exactly_half_the_chunks_scores_zero_not_the_floor(kb, backend):
    """IDF log((N - df + .5) / (df + .5)) is 0 when df = N/2: rank-bm25 floors only negative IDFs."""
    if backend == "milvus":
        pytest.skip("Milvus scores with Lucene's IDF (never negative, no floor), not rank-bm25's")
    kb.ingest([{"id": "a", "text": "lamp oil"}, {"id": "b", "text": "lamp fog"}, {"id": "c", "text": "wick"},
               {"id": "d", "text": "tower"}])
    hits = kb.search("lamp", k=4, mode="bm25", log=False).hits
    assert {h.doc_id for h in hits} == {"a", "b"} and all(h.score == 0.0 for h in hits)


def test_replaying_a_removal_of_many_chunks_equals_an_engine_built_from_scratch(tmp_path):
    """A removal of more chunks than one SQL batch (500) travels through the log whole: a process that
    replays it scores exactly like an engine built from the store."""
    from writeback_rag.index import BM25

    kb = KnowledgeBase.create(tmp_path / "kb", embedder="hash", config={"chunking": {"size": 16, "overlap": 0}},
                              notify=lambda m: None)
    words = "lamp tower keeper fog siren lens gale rock beacon oil wick cottage relief boat storm".split()
    long = " ".join(f"{words[i % 15]} {words[(i * 7) % 15]} number{i % 50} sentence ends here." for i in range(1500))
    kb.ingest([{"id": "long", "text": long}, {"id": "other", "text": "lamp keeper gale rock and a beacon " * 3}])
    reader = KnowledgeBase.open(kb.path, notify=lambda m: None)
    reader.search("lamp", mode="bm25", log=False)  # its engine is in memory, before the removal
    n_long = kb.conn.execute("SELECT COUNT(*) FROM chunks WHERE doc_id='long'").fetchone()[0]
    assert n_long > 600
    kb.delete(["long"])
    for q in ("lamp keeper", "gale rock beacon", "number7"):
        got = [(h.chunk_id, round(h.score, 5)) for h in reader.search(q, k=10, mode="bm25", log=False).hits]
        engine = BM25(reader.records, 1.2, 0.75)
        want = [(int(i), round(float(s), 5)) for i, s in zip(*engine.search(q, 10))]
        assert got == want, q
    assert reader.check()["ok"]
    reader.close()
    kb.close()


def test_chunking_exact_boundaries_and_overlap():
    from writeback_rag.text import chunk_text, normalize_answer

    text = "A one. B two. C three. D four."  # 3 tokens per sentence
    assert chunk_text(text, size=7, overlap=3) == ["A one. B two.", "B two. C three.", "C three. D four."]
    assert chunk_text(text, size=6, overlap=0) == ["A one. B two.", "C three. D four."]  # exactly full
    assert chunk_text(text, size=7, overlap=2) == ["A one. B two.", "C three. D four."]  # 3 > overlap 2
    assert chunk_text("w w w.", size=4, overlap=0) == ["w w w."]  # a sentence of exactly `size` is kept whole
    assert chunk_text("w w w w w w w w.", size=4, overlap=0) == ["w w w w", "w w w w."]
    assert normalize_answer("The  Lamp-Room, an Old one!") == "lamp room old one"
