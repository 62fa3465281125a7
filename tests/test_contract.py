"""Contracts run unchanged against every implementation of an index interface. Dense (FAISS flat and HNSW today; a
distributed engine next): add, search, filtered search, remove where supported, save and load with the
change-log sequence, and refusal of a damaged file."""

import json
import os

import numpy as np
import pytest

from writeback_rag.index import DenseIndex

KINDS = ["flat", "hnsw"]


def unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@pytest.fixture
def vectors():
    rng = np.random.default_rng(0)
    return np.arange(10, 210, dtype=np.int64), unit(rng.normal(size=(200, 16)))


@pytest.mark.parametrize("kind", KINDS)
def test_nearest_first_with_cosine_scores(kind, vectors):
    ids, vecs = vectors
    d = DenseIndex(16, kind)
    d.add(ids, vecs)
    assert d.count == 200
    got, scores = d.search(vecs[7], 5)
    assert got[0] == ids[7] and scores[0] == pytest.approx(1.0, abs=1e-5)
    assert list(scores) == sorted(scores, reverse=True)
    want = ids[np.argsort(-(vecs @ vecs[7]))[:5]]
    assert set(got.tolist()) == set(want.tolist())


@pytest.mark.parametrize("kind", KINDS)
def test_filtered_search_returns_only_allowed_ids(kind, vectors):
    ids, vecs = vectors
    d = DenseIndex(16, kind)
    d.add(ids, vecs)
    allowed = ids[100:110]
    mask = np.zeros(300, dtype=bool)
    mask[allowed] = True
    got, _ = d.search(vecs[7], 5, mask)
    assert len(got) == 5 and set(got.tolist()) <= set(allowed.tolist())
    assert len(d.search(vecs[7], 5, np.zeros(300, bool))[0]) == 0
    short = np.zeros(ids[50], dtype=bool)  # a mask shorter than the ids: those beyond it are out
    short[ids[40]] = True
    assert d.search(vecs[7], 5, short)[0].tolist() == [ids[40]]
    assert len(DenseIndex(16, kind).search(vecs[7], 5)[0]) == 0  # empty index


@pytest.mark.parametrize("kind", KINDS)
def test_remove_where_supported(kind, vectors):
    ids, vecs = vectors
    d = DenseIndex(16, kind)
    d.add(ids, vecs)
    if not d.can_remove:
        pytest.skip(f"{kind} cannot remove: the index owner rebuilds it instead")
    d.remove(ids[:3])
    d.remove(np.array([999_999]))  # absent: a no-op
    assert d.count == 197 and ids[0] not in d.search(vecs[0], 10)[0]


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_keeps_results_and_sequence_and_refuses_damage(kind, vectors, tmp_path):
    ids, vecs = vectors
    d = DenseIndex(16, kind)
    d.add(ids, vecs)
    d.seq = 42
    path = str(tmp_path / "dense.faiss")
    expect = {"model_id": "m", "kb_created": "1", "kind": kind}
    d.save(path, expect)
    e, why = DenseIndex.load(path, expect)
    assert why == "ok" and e.seq == 42 and e.count == 200 and e.kind == kind
    assert np.array_equal(e.search(vecs[3], 7)[0], d.search(vecs[3], 7)[0])
    assert DenseIndex.load(path, dict(expect, kb_created="2"))[0] is None  # another KB's file
    with open(path, "r+b") as f:
        f.seek(200)
        f.write(b"\xff" * 64)
    e, why = DenseIndex.load(path, expect)
    assert e is None and "checksum" in why


# ---- sparse ------------------------------------------------------------------------------------------
# The sparse contract, run unchanged against every sparse engine: built from a store, kept up to date by
# replaying changes (added rows, removed chunks with their postings), filtered by a mask, saved and loaded
# with its change-log sequence. An engine is a class with that interface; BM25 is the one we ship.

from writeback_rag import KnowledgeBase  # noqa: E402
from writeback_rag.index import BM25  # noqa: E402

SPARSE = [BM25]
WORDS = "lamp tower keeper fog siren lens gale rock beacon oil wick cottage relief boat storm".split()


@pytest.fixture
def store(tmp_path):
    kb = KnowledgeBase.create(tmp_path / "kb", embedder="hash", notify=lambda m: None)
    rng = np.random.default_rng(1)
    kb.ingest([{"id": f"d{i}", "text": " ".join(rng.choice(WORDS, size=int(rng.integers(4, 20))))}
               for i in range(120)])
    yield kb
    kb.close()


def ranked(engine, q, n=10, mask=None):
    ids, scores = engine.search(q, n, mask)
    return [(int(i), round(float(s), 5)) for i, s in zip(ids, scores)]


@pytest.mark.parametrize("engine", SPARSE)
def test_sparse_ranks_by_score_then_chunk_id(engine, store):
    e = engine(store.records)
    got = ranked(e, "lamp keeper gale", 20)
    assert len(got) == 20 and e.n_docs == 120
    assert got == sorted(got, key=lambda x: (-x[1], x[0]))
    assert ranked(e, "zeppelin") == [] and ranked(e, "lamp", 0) == []


@pytest.mark.parametrize("engine", SPARSE)
def test_sparse_replay_equals_a_fresh_build(engine, store):
    e = engine(store.records)
    store.ingest([{"id": "new", "text": "lamp lamp keeper zeppelin"}])
    store.delete([f"d{i}" for i in range(0, 120, 3)])
    store.ingest([{"id": "d1", "text": "gale gale gale rock"}])  # an update: remove + add
    records = store.records
    for seq, added, removed, postings, _ in records.changes(e.seq, store.generation):
        e.remove(removed, postings)
        e.add(records, records.chunks(["text", "title"], added.tolist()))
        e.seq = seq
    fresh = engine(records)
    assert e.n_docs == fresh.n_docs
    for q in ("lamp keeper", "zeppelin", "gale rock", "fog siren lens oil"):
        assert ranked(e, q) == ranked(fresh, q), q


@pytest.mark.parametrize("engine", SPARSE)
def test_sparse_mask_restricts_and_a_short_mask_excludes_the_rest(engine, store):
    e = engine(store.records)
    allowed = [cid for cid, _ in ranked(e, "lamp", 40)][::2]
    mask = np.zeros(max(allowed) + 1, dtype=bool)
    mask[allowed] = True
    got = [cid for cid, _ in ranked(e, "lamp", 10, mask)]
    assert got and set(got) <= set(allowed)
    assert ranked(e, "lamp", 10, np.zeros(5, dtype=bool)) == []


@pytest.mark.parametrize("engine", SPARSE)
def test_sparse_save_load_keeps_results_and_sequence_and_refuses_damage(engine, store, tmp_path):
    e = engine(store.records)
    path = str(tmp_path / "sparse.npz")
    expect = {"model_id": "m", "kb_created": "1"}
    e.save(path, expect)
    loaded, why = engine.load(path, expect)
    assert why == "ok" and loaded.seq == e.seq and loaded.n_docs == e.n_docs
    assert ranked(loaded, "lamp keeper gale") == ranked(e, "lamp keeper gale")
    assert engine.load(path, dict(expect, kb_created="2"))[0] is None  # another KB's file
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\xff" * 64)
    assert engine.load(path, expect)[0] is None


# ---- record store ------------------------------------------------------------------------------------
# What the derived indexes read from the records (store.Records), run unchanged against every record store:
# a factory turns a KnowledgeBase into the Records over its records. SQLite's is the one we ship.

from writeback_rag.filters import Filter  # noqa: E402

RECORDS = [pytest.param(lambda kb: kb.records, id="sqlite")]


def live(records):
    return [r[0] for r in records.chunks([])]


@pytest.mark.parametrize("records_of", RECORDS)
def test_records_log_every_change_in_order_and_say_how_far_behind(records_of, store):
    r = records_of(store)
    h0, before = r.head(), live(r)
    store.ingest([{"id": "new1", "text": "lamp zeppelin"}, {"id": "new2", "text": "fog zeppelin"}])
    h1 = r.head()
    added = sorted(set(live(r)) - set(before))
    assert h1 > h0 and len(added) == 2
    tail = r.changes(h0, h1)
    assert [c[0] for c in tail] == sorted(c[0] for c in tail) and tail[-1][0] == h1
    assert sorted(int(i) for c in tail for i in c[1]) == added and not any(len(c[2]) for c in tail)
    assert r.pending(h0, h1)[:2] == (len(tail), 2) and not r.removes(h0, h1)
    store.delete(["new1"])
    h2 = r.head()
    gone = sorted(int(i) for c in r.changes(h1, h2) for i in c[2])
    assert gone == [added[0]] and added[0] not in live(r) and r.removes(h1, h2) and not r.removes(h0, h1)
    assert r.changes(h2, h2) == [] and r.pending(h2, h2)[0] == 0


@pytest.mark.parametrize("records_of", RECORDS)
def test_records_give_the_asked_fields_of_live_chunks(records_of, store):
    r = records_of(store)
    store.ingest([{"id": "m1", "title": "Keeper", "text": "lamp oil", "metadata": {"lang": "en"}}])
    store.delete(["d3"])
    ids = live(r)
    assert ids == sorted(ids) and len(ids) == 120
    (cid, kind, text, title, doc, source, vec), = r.chunks(["kind", "text", "title", "doc", "source", "vector"],
                                                          [ids[-1]])
    assert (kind, text, title, doc, source) == ("source", "lamp oil", "Keeper", "m1", store.document("m1")["source"])
    assert np.allclose(np.frombuffer(vec, dtype=np.float32), r.vector(cid))
    assert r.passages([cid]) == {cid: ("Keeper", "lamp oil")} and sorted(r.passages(range(1, 2000))) == ids
    assert json.loads(r.chunks(["meta"], [cid])[0][1]) == {"lang": "en"}
    hit, = r.hits([cid])
    assert hit[:6] == (cid, "m1", "lamp oil", "Keeper", "source", source) and json.loads(hit[6]) == {"lang": "en"}
    assert r.chunks(["kind"], [10 ** 9]) == []  # unknown and removed chunks are not live
    assert [x[0] for x in r.chunks([], list(range(1, 10 ** 4)))] == ids  # any number of ids
    assert r.chunks([], kind="unit") == [] and len(r.chunks([], kind="source")) == 120
    batches = list(r.scan(["kind"], 50))
    assert [len(b) for b in batches] == [50, 50, 20] and [x[0] for b in batches for x in b] == ids


@pytest.mark.parametrize("records_of", RECORDS)
def test_records_evaluate_a_filters_document_predicates(records_of, store, tmp_path):
    r = records_of(store)
    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"id": "m1", "text": "lamp", "metadata": {"lang": "en", "n": 3}}))
    (folder / "b.jsonl").write_text(json.dumps({"id": "m2", "text": "lamp", "metadata": {"lang": "fr"}}))
    store.ingest(str(folder))
    (m1, d1), (m2, d2) = r.chunks(["doc"])[-2:]
    assert {d1, d2} == {"m1", "m2"}
    if d1 == "m2":
        m1, m2 = m2, m1
    assert r.ids(Filter.parse({"doc": "m*"})).tolist() == sorted([m1, m2])
    assert r.ids(Filter.parse({"source": "b.jsonl"})).tolist() == [m2]
    assert r.ids(Filter.parse({"lang": "en"})).tolist() == [m1]
    assert r.ids(Filter.parse({"meta.n": 3})).tolist() == [m1]
    assert r.ids(Filter.parse({"doc": "d1?", "kind": "unit"})).tolist() == \
        [c for c, d in r.chunks(["doc"]) if len(d) == 3 and d.startswith("d1")]  # kinds are the index's business
    assert r.ids(Filter.parse({"lang": "de"})).tolist() == []


@pytest.mark.parametrize("records_of", RECORDS)
def test_records_snapshot_holds_one_state_while_another_process_writes(records_of, store, tmp_path):
    r = records_of(store)
    other = KnowledgeBase.open(tmp_path / "kb", notify=lambda m: None)
    try:
        with r.snapshot():
            h, n = r.head(), len(live(r))
            other.ingest([{"id": "late", "text": "storm"}])
            assert r.head() == h and len(live(r)) == n
        assert r.head() > h and len(live(r)) == n + 1
    finally:
        other.close()


@pytest.mark.parametrize("records_of", RECORDS)
def test_records_term_dictionary_counts_source_chunks(records_of, store):
    r = records_of(store)
    store.ingest([{"id": "z1", "text": "zeppelin zeppelin"}, {"id": "z2", "text": "zeppelin lamp"}])
    terms = r.terms()
    assert "zeppelin" in terms and len(set(terms.values())) == len(terms)
    cache = {}
    got = r.term_ids(cache, {"zeppelin", "nosuchterm"})
    assert got == {"zeppelin": terms["zeppelin"]} and cache["zeppelin"] == terms["zeppelin"]
    assert r.df(["zeppelin", "nosuchterm"]) == {"zeppelin": 2}
    store.delete(["z1"])
    assert r.df(["zeppelin"]) == {"zeppelin": 1}
    sample = r.sample_terms(5)
    assert len(sample) == 5 and all(terms[t] == i and r.df([t]) == {t: df} for i, t, df in sample)


@pytest.mark.parametrize("records_of", RECORDS)
def test_records_keep_the_position_an_outside_index_reached(records_of, store):
    r = records_of(store)
    assert r.position("some_index") == -1
    r.set_position("some_index", 7)
    assert r.position("some_index") == 7 and records_of(store).position("other") == -1
