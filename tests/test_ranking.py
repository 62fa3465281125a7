"""The learned rerankers (ranking.py), one per search mode: fitted by write-back on the feedback's questions,
they rank passages for questions nobody asked before by what the retrievers alone miss.

Each question names a thing and two words. Its answer holds them in one sentence; a decoy repeats them
across separate sentences, so BM25 and the bag-of-words embedder both rank the decoy first, and no fusion
weight can change that. What the feedback teaches (the question's words together in one sentence) can."""

import numpy as np
import pytest

from typer.testing import CliRunner

from writeback_rag import KnowledgeBase
from writeback_rag.cli import app
from writeback_rag.ranking import DEPTH, FEATURES, Ranker, dumps, features, fit, loads, reorder

BACKENDS = ["embedded", "milvus"]

ASKED, NEW = 150, 20  # topics with a labelled question, and topics nobody asks about before the night


def words(i):
    return f"zorbel{i}x", f"mavren{i}k", f"tulsop{i}q"


def question(i):
    thing, a, b = words(i)
    return f"{a} {b} {thing}"


def docs():
    out = []
    for i in range(ASKED + NEW):
        thing, a, b = words(i)
        out.append({"id": f"ans{i}", "title": f"Note {i}",
                    "text": f"The {thing} met {a} {b} at dawn. Nothing else happened that day in the valley."})
        out.append({"id": f"dec{i}", "title": f"Log {i}",
                    "text": f"The {thing} was seen. Later {a} came. Then {a} left. Much later {b} arrived. "
                            f"Then {b} stayed. The {thing} rested."})
    return out


def mrr(kb, mode, topics):
    out = []
    for i in topics:
        hits = kb.search(question(i), k=10, mode=mode, log=False, include_units=False).hits
        out.append(next((1 / h.rank for h in hits if h.doc_id == f"ans{i}"), 0.0))
    return float(np.mean(out))


@pytest.fixture
def notes(tmp_path, kb_config):
    # no query adapter: what search gains here comes from the rankers alone
    k = KnowledgeBase.create(tmp_path / "kb", embedder="hash", notify=lambda m: None,
                             config={**kb_config, "learning": {"adapter": False}})
    k.ingest(docs())
    yield k
    k.close()


def test_the_ranker_learns_from_feedback_what_helps_new_questions_and_rolls_back(notes):
    unseen = range(ASKED, ASKED + NEW)
    before = {m: mrr(notes, m, unseen) for m in ("bm25", "dense", "hybrid")}
    assert before["hybrid"] < 0.6 and before["bm25"] < 0.6  # the decoys come first
    notes.label([{"id": f"q{i}", "query": question(i), "relevant": [f"ans{i}"]} for i in range(ASKED)], k=5)
    rep = notes.writeback()
    t = rep["tuning"]
    assert t["status"] == "adopted" and t["ranker"] == ["bm25", "dense", "hybrid"], t
    assert t["metrics"]["candidate"]["hybrid"] > t["metrics"]["current"]["hybrid"]
    for mode in ("bm25", "dense"):  # each mode's ranker was kept because the held-out questions rank better
        assert t["metrics"]["rankers"][mode]["candidate"] > t["metrics"]["rankers"][mode]["current"]
    [row] = notes.tunings()
    assert row["ranker"] == ["bm25", "dense", "hybrid"] and row["status"] == "adopted"
    shown = CliRunner().invoke(app, ["tunings", "--kb", str(notes.path)])
    assert shown.exit_code == 0 and "rerankers=bm25,dense,hybrid" in shown.output, shown.output
    after = {m: mrr(notes, m, unseen) for m in ("bm25", "dense", "hybrid")}
    assert min(after.values()) > 0.9, (before, after)
    # a search for fewer hits than the ranker reorders still reorders its whole top (not only the k asked for)
    for mode in ("bm25", "dense", "hybrid"):
        firsts = [notes.search(question(i), k=1, mode=mode, log=False, include_units=False).hits[0].doc_id
                  for i in unseen]
        assert sum(d.startswith("ans") for d in firsts) > 0.9 * len(firsts), (mode, firsts)
    # a process that opens the KB later uses the stored rankers too
    again = KnowledgeBase.open(notes.path, notify=lambda m: None)
    try:
        assert {m: mrr(again, m, unseen) for m in after} == pytest.approx(after)
        again.config["retrieval"]["learned"] = False  # searches as before any learning
        assert {m: mrr(again, m, unseen) for m in after} == pytest.approx(before)
    finally:
        again.close()
    notes.rollback(rep["run_id"])
    assert {m: mrr(notes, m, unseen) for m in after} == pytest.approx(before)


def test_no_ranker_is_fitted_when_it_is_turned_off(tmp_path, kb_config):
    k = KnowledgeBase.create(tmp_path / "kb", embedder="hash", notify=lambda m: None,
                             config={**kb_config, "learning": {"adapter": False, "ranker": False}})
    try:
        k.ingest(docs())
        before = {m: mrr(k, m, range(ASKED, ASKED + NEW)) for m in ("bm25", "dense", "hybrid")}
        k.label([{"id": f"q{i}", "query": question(i), "relevant": [f"ans{i}"]} for i in range(ASKED)], k=5)
        t = k.writeback()["tuning"]
        assert t["ranker"] == [] and k.tunings()[0]["ranker"] == [] and "rankers" not in t["metrics"]
        assert "rerankers=none" in CliRunner().invoke(app, ["tunings", "--kb", str(k.path)]).output
        for m in ("bm25", "dense", "hybrid"):
            assert mrr(k, m, range(ASKED, ASKED + NEW)) < 0.6 and before[m] < 0.6
    finally:
        k.close()


# ---- the parts, on their own --------------------------------------------------------------------------


def _feature(X, name):
    return X[:, FEATURES.index(name)]


def test_features_see_where_the_question_words_sit():
    texts = {1: ("Note", "The zorbel met mavren tulsop at dawn. Nothing else happened."),
             2: ("Log", "The zorbel was seen. Later mavren came. Much later tulsop arrived."),
             3: ("Zorbel facts", "Unrelated words only here.")}
    weights = {"zorbel": 1.0, "mavren": 2.0, "tulsop": 1.0}
    fused, bm, dn = {1: 0.03, 2: 0.02, 3: 0.01}, {1: 4.0, 2: 8.0}, {1: 0.5, 3: 0.7}
    X = features("mavren tulsop zorbel", [1, 2, 3], fused, bm, dn, texts, weights, rrf_k=60)
    assert X.shape == (3, len(FEATURES))
    assert _feature(X, "words in passage").tolist() == [1.0, 1.0, 0.0]
    assert _feature(X, "words in best sentence").tolist() == [1.0, 0.5, 0.0]
    assert _feature(X, "words in best two sentences").tolist() == [1.0, 0.75, 0.0]
    assert _feature(X, "words in title").tolist() == [0.0, 0.0, 0.25]
    assert _feature(X, "word pairs in passage").tolist() == [0.5, 0.0, 0.0]  # (mavren, tulsop) of two pairs
    assert _feature(X, "bm25 / best bm25").tolist() == [0.5, 1.0, 0.0]
    assert _feature(X, "bm25 rrf term").tolist() == pytest.approx([1 / 62, 1 / 61, 1 / 161])
    assert _feature(X, "dense rrf term").tolist() == pytest.approx([1 / 62, 1 / 161, 1 / 61])
    assert _feature(X, "cosine - best cosine").tolist() == pytest.approx([-0.2, -1.0, 0.0])
    assert _feature(X, "fused rank").tolist() == pytest.approx([1.0, 0.5, 1 / 3])
    # stems: "founded" in the question meets "found" in the passage
    Y = features("founded zorbel", [1], {1: 1.0}, {}, {}, {1: ("", "The zorbel found it.")},
                 {"founded": 1.0, "zorbel": 1.0}, 60)
    assert _feature(Y, "word stems in best sentence").tolist() == [1.0]
    assert _feature(Y, "words in best sentence").tolist() == [0.5]


def test_reorder_moves_candidates_within_their_slots_and_leaves_the_rest():
    ranker = Ranker(np.array([1.0]), np.zeros(1), np.ones(1))
    fused = {1: 0.9, 2: 0.8, 3: 0.7, "unit": 0.85, 9: 0.1}
    out = reorder(ranker, fused, [1, 2, 3], np.array([[0.0], [5.0], [1.0]]))
    assert out == {2: 0.9, 3: 0.8, 1: 0.7, "unit": 0.85, 9: 0.1}
    assert reorder(ranker, fused, [1], np.array([[0.0]])) == fused


def test_fit_learns_the_feature_that_marks_the_relevant_candidates():
    rng = np.random.default_rng(0)
    questions = []
    for _ in range(200):
        X = rng.normal(size=(DEPTH, len(FEATURES)))
        y = np.zeros(DEPTH)
        y[rng.integers(DEPTH)] = 1
        X[:, 4] += 3 * y  # the fifth feature marks the relevant one; the others are noise
        questions.append((X, y))
    r = fit(questions)
    assert int(np.argmax(r.weights)) == 4
    top = [int(np.argmax(r.score(X))) == int(np.argmax(y)) for X, y in questions]
    best = [int(np.argmax(X[:, 4])) == int(np.argmax(y)) for X, y in questions]  # the marking feature alone
    assert np.mean(top) >= np.mean(best) - 0.02 and np.mean(top) > 0.7
    assert loads(dumps({"dense": r}))["dense"].weights.tolist() == r.weights.tolist()
    assert loads('{"bm25": {"features": ["other"], "weights": [1], "mean": [0], "scale": [1]}}') == {}
    assert dumps({}) is None and loads(None) == {}
    assert fit([(np.zeros((3, len(FEATURES))), np.zeros(3))]) is None  # nothing relevant: nothing to learn


def test_idf_comes_from_the_record_store_and_a_long_question_fits(kb):
    from writeback_rag.ranking import idf

    kb.ingest([{"id": "a", "text": "common rare"}, {"id": "b", "text": "common"}, {"id": "c", "text": "other"}])
    words = ["common", "rare", "unseen"] + [f"w{i}" for i in range(1500)]  # more than SQLite's 999 variables
    w = idf(kb.records, words, 3)
    assert len(w) == len(words)
    assert w["common"] < w["rare"] < w["unseen"] == w["w7"]
