"""One contract, run unchanged against every dense index implementation (FAISS flat and HNSW today; a
distributed engine next): add, search, filtered search, remove where supported, save and load with the
change-log sequence, and refusal of a damaged file."""

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
