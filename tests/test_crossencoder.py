"""The cross-encoder hybrid search learns from feedback (crossencoder.py): how its scores join the ranker's
features, that it trains and is stored and loaded on the real MiniLM, that a search reads it through the
ranker that weighs it (and stops when learning is off or the night is rolled back), and that write-back
fits it only when asked and keeps it only where the held-out questions rank better."""

import numpy as np
import pytest
from typer.testing import CliRunner

from writeback_rag import KnowledgeBase, store, tuning
from writeback_rag.cli import app
from writeback_rag.crossencoder import TOP, CrossEncoder, Stored, transformer_of
from writeback_rag.ranking import CROSS_FEATURES, FEATURES, Ranker, dumps, fit, loads, with_cross_encoder


def _first_by(column):
    """A ranker over FEATURES that ranks by one of them."""
    w = np.zeros(len(FEATURES))
    w[column] = 1.0
    return Ranker(w, np.zeros(len(FEATURES)), np.ones(len(FEATURES)))


def test_the_cross_encoder_reads_the_first_rankers_best_and_the_rest_rank_below_them():
    X = np.zeros((14, len(FEATURES)))
    X[:, 5] = np.arange(14)[::-1] * 0.01  # cosine: candidate 0 best
    X[3, 5] = 1.0  # candidate 3 best of all
    asked = []

    def score(ids):
        asked.append(list(ids))
        return np.arange(len(ids), dtype=float)  # the last one read scores highest

    cands = [100 + i for i in range(14)]
    out = with_cross_encoder(_first_by(5), cands, X, score, top=4)
    assert asked == [[103, 100, 101, 102]]  # the first ranker's best 4, best first
    assert out.shape == (14, len(FEATURES) + len(CROSS_FEATURES))
    assert np.array_equal(out[:, :len(FEATURES)], X)
    assert list(out[[3, 0, 1, 2], -2]) == [0.0, 1.0, 2.0, 3.0]
    assert set(out[4:, -2]) == {-1.0}  # not read: below the lowest score read
    assert np.allclose(out[:, -1], out[:, -2] - 3.0)


def test_a_ranker_that_reads_a_cross_encoder_is_stored_with_its_first_ranker():
    first = _first_by(1)
    r = Ranker(np.arange(15.0), np.zeros(15), np.ones(15), first)
    assert r.features == FEATURES + CROSS_FEATURES and first.features == FEATURES
    back = loads(dumps({"hybrid": r, "bm25": first}))
    assert np.array_equal(back["hybrid"].weights, r.weights) and np.array_equal(back["hybrid"].first.weights, first.weights)
    assert back["bm25"].first is None
    # stored for a feature set this version does not compute: not used
    wrong = r.to_dict()
    del wrong["first"]
    assert Ranker.from_dict(wrong) is None


def test_fit_with_a_first_ranker_learns_the_cross_encoder_score_that_marks_the_relevant():
    rng = np.random.default_rng(0)
    qs = []
    for _ in range(80):
        X = rng.normal(size=(12, len(FEATURES) + 2))
        y = np.zeros(12)
        y[rng.integers(12)] = 1
        X[:, -2] += 3 * y  # the cross-encoder's score marks it; nothing else does
        qs.append((X, y))
    first = _first_by(0)
    r = fit(qs, first=first)
    assert r.first is first and r.features == FEATURES + CROSS_FEATURES
    assert int(np.argmax(r.weights)) == len(FEATURES)


@pytest.fixture(scope="module")
def minilm():
    from writeback_rag.backends import get_embedder

    return get_embedder({"name": "minilm"})


def _marked(i):
    """A question and four passages about a made-up thing; the one that says 'confirmed by the registry'
    answers it (nothing in the question says so: the model has to learn it from feedback)."""
    thing = f"the vessel Korrin-{i}"
    pos = ("Harbour notes", f"Records about {thing} were confirmed by the registry in spring.")
    negs = [("Harbour notes", f"Records about {thing} were lost in a fire in spring."),
            ("Harbour notes", f"Records about {thing} were copied by a clerk in spring."),
            ("Harbour notes", f"Records about {thing} were never written down in spring.")]
    return f"Where are the records about {thing}?", pos, negs


def test_the_cross_encoder_learns_from_feedback_and_its_stored_bytes_score_the_same(minilm):
    from writeback_rag.backends import HashEmbedder

    assert transformer_of(HashEmbedder()) is None

    def firsts(model, rows):
        return np.mean([int(np.argmax(model.scores(q, [pos] + negs)) == 0) for q, pos, negs in rows])

    model = CrossEncoder(minilm)
    new = [_marked(i) for i in range(100, 120)]
    before = firsts(model, new)
    model.train([_marked(i) for i in range(48)], lr=1e-4, accumulate=1)
    after = firsts(model, new)
    assert after >= 0.9 and after > before, (before, after)
    blob = model.to_bytes()
    assert 10e6 < len(blob) < 30e6  # the trained weights in bfloat16, the word embeddings left out
    again = Stored(blob).get(minilm)
    q, pos, negs = new[0]
    a, b = model.scores(q, [pos] + negs), again.scores(q, [pos] + negs)
    assert np.argmax(a) == np.argmax(b) and np.allclose(a, b, atol=0.05 * (np.ptp(a) + 1e-6))
    assert Stored(blob).get(HashEmbedder()) is None  # no transformer: the ranker ranks without it
    assert Stored(b"not a model").get(minilm) is None  # bytes that do not load: the same


def test_stored_bytes_that_do_not_load_are_tried_once_not_on_every_search(minilm, monkeypatch):
    from writeback_rag import crossencoder

    made = []

    def counting(*args, **kwargs):
        made.append(1)
        return CrossEncoder(*args, **kwargs)

    monkeypatch.setattr(crossencoder, "CrossEncoder", counting)
    bad = Stored(b"not a model")
    assert [bad.get(minilm) for _ in range(3)] == [None, None, None]
    assert len(made) == 1  # a search after the first does not copy the transformer again to fail again


DOCS = [{"id": f"d{i}", "title": f"Vessel {i}", "text": t} for i, t in enumerate([
    "The vessel Korrin sailed north with grain in spring.",
    "Records of the vessel Korrin were confirmed by the registry.",
    "The harbour of Korrin closed in winter after the storms.",
    "Korrin is also the name of a small mountain village.",
    "A vessel named after Korrin carried salt and wool.",
    "The registry lists every vessel that sailed from the north.",
    "Grain prices rose in spring when the vessel did not return.",
    "Storms in winter closed the northern harbour for weeks.",
])]


def _order(kb, q):
    return [h.doc_id for h in kb.search(q, k=8, mode="hybrid", log=False, include_units=False).hits]


def test_hybrid_search_ranks_by_the_adopted_cross_encoder_until_learning_is_off_or_rolled_back(tmp_path, minilm):
    kb = KnowledgeBase.create(tmp_path / "kb", embedder="minilm", notify=lambda m: None)
    kb.ingest(DOCS)
    q = "Which vessel sailed from the north in spring?"
    plain = _order(kb, q)
    model = CrossEncoder(minilm)
    model.train([_marked(i) for i in range(8)], lr=1e-4, accumulate=1)
    # a ranker that keeps the fused order for its first pass and then follows the cross-encoder alone
    w = np.zeros(len(FEATURES) + 2)
    w[-2] = 1.0
    ranker = Ranker(w, np.zeros(len(w)), np.ones(len(w)), _first_by(1))
    report = {"id": "tuning:ce", "status": "adopted", "bm25_weight": 0.5, "rrf_k": 60, "hybrid_adapter": False,
              "examples": 1, "holdout": 1, "reason": "a test",
              "metrics": {"current": {"dense": 0.5, "hybrid": 0.5}, "candidate": {"dense": 0.5, "hybrid": 0.6}}}
    with store.transaction(kb.conn):
        tuning.record(kb.conn, report, ("ce", kb.model_id, minilm.dim, None, {"hybrid": ranker}, Stored(model=model)))
    texts = {d["id"]: (d["title"], d["text"]) for d in DOCS}
    want = list(np.array(plain)[np.argsort(-model.scores(q, [texts[d] for d in plain]), kind="stable")])
    assert want != plain  # the cross-encoder disagrees with the fused order here
    assert len(plain) <= TOP and _order(kb, q) == want
    other = KnowledgeBase.open(tmp_path / "kb", notify=lambda m: None)  # another process: reads the stored bytes
    assert _order(other, q) == want
    [row] = kb.tunings()
    assert row["cross_encoder"] is True
    shown = CliRunner().invoke(app, ["tunings", "--kb", str(kb.path)])
    assert "cross_encoder=yes" in shown.output, shown.output
    kb.config["retrieval"]["learned"] = False
    assert _order(kb, q) == plain
    kb.config["retrieval"]["learned"] = True
    with store.transaction(kb.conn):
        tuning.rollback(kb.conn, "ce")
    assert _order(other, q) == plain
    other.close()
    kb.close()


def _labelled(n):
    rows = []
    for i in range(n):
        q, pos, negs = _marked(i)
        rows.append((q, {"id": f"p{i}", "title": pos[0], "text": pos[1]},
                     [{"id": f"n{i}-{j}", "title": t, "text": x} for j, (t, x) in enumerate(negs)]))
    return rows


def test_write_back_fits_a_cross_encoder_only_when_asked_and_reports_the_held_out_verdict(tmp_path):
    rows = _labelled(70)
    docs = [d for _, pos, negs in rows for d in [pos] + negs]
    labels = [{"id": f"q{i}", "query": q, "relevant": [pos["id"]]} for i, (q, pos, _) in enumerate(rows)]
    kb = KnowledgeBase.create(tmp_path / "kb", embedder="minilm", notify=lambda m: None,
                              config={"learning": {"adapter": False, "cross_encoder": 30, "min_holdout": 10}})
    kb.ingest(docs)
    kb.label(labels, k=5)
    t = kb.writeback()["tuning"]
    ce = t["metrics"]["cross_encoder"]
    assert 0 < ce["questions"] <= 30 and set(ce["held_out"]) == {"without", "with"}, ce
    [row] = kb.tunings()
    ranker = tuning.load(kb.conn, row["id"]).rankers["hybrid"] if row["status"] == "adopted" else None
    # kept only where the held-out questions rank better; then stored with the ranker that reads it
    assert ce["kept"] == (ce["held_out"]["with"] > ce["held_out"]["without"])
    if row["status"] == "adopted":
        assert row["cross_encoder"] == t["cross_encoder"] == ce["kept"] == (ranker.first is not None)
    kb.close()
    # off (the default): none fitted, nothing reported
    kb2 = KnowledgeBase.create(tmp_path / "kb2", embedder="minilm", notify=lambda m: None,
                               config={"learning": {"adapter": False, "min_holdout": 10}})
    kb2.ingest(docs)
    kb2.label(labels, k=5)
    t2 = kb2.writeback()["tuning"]
    assert "cross_encoder" not in t2["metrics"] and not t2["cross_encoder"]
    assert all(r.first is None for r in tuning.load(kb2.conn, kb2.tunings()[0]["id"]).rankers.values())
    kb2.close()


def test_an_embedder_without_a_transformer_learns_no_cross_encoder_and_says_why(tmp_path):
    rows = _labelled(70)
    kb = KnowledgeBase.create(tmp_path / "kb", embedder="hash", notify=lambda m: None,
                              config={"learning": {"adapter": False, "cross_encoder": 30, "min_holdout": 10}})
    kb.ingest([d for _, pos, negs in rows for d in [pos] + negs])
    kb.label([{"id": f"q{i}", "query": q, "relevant": [pos["id"]]} for i, (q, pos, _) in enumerate(rows)], k=5)
    t = kb.writeback()["tuning"]
    assert t["metrics"]["cross_encoder"] == {"kept": False, "reason": "the embedder has no transformer to make one of"}
    assert not t["cross_encoder"] and not kb.tunings()[0]["cross_encoder"]
    kb.close()
