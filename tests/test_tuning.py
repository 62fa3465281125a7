"""Retrieval that learns from feedback (tuning.py): the query adapter and fusion weights fitted by write-back
help questions nobody asked, are adopted only when the held-out feedback says so, and roll back with their run.

The corpus names each thing by one word and the questions by another (a synonym no retriever knows), so
the static KB cannot find the documents and only what was learned from other questions can."""

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from writeback_rag import KnowledgeBase
from writeback_rag.cli import app
from writeback_rag.tuning import UNIT_MODES, UNTUNED, Tuning, decide, fuse, in_holdout

BACKENDS = ["embedded", "milvus"]  # every test that builds a KB runs on both (conftest.pytest_generate_tests)

N = 30
ASKED = ("where is the {} kept", "who looks after the {}", "when can visitors see the {}",
         "how old is the {}", "who made the {}")
NEW = "what is known about the {}"  # a template no labelled question uses


def thing(i):
    return f"zorbel{i}x"


def alias(i):
    return f"quillan{i}y"


DOCS = [{"id": f"d{i}", "title": f"Hall item {i}",
         "text": f"The {thing(i)} is kept in the north hall. Visitors often ask about the {thing(i)} and its keeper."}
        for i in range(N)]


def labels(relevant=lambda i, q: f"d{i}"):
    return [{"id": f"q{i}-{t}", "query": tpl.format(alias(i)), "relevant": [relevant(i, tpl.format(alias(i)))]}
            for i in range(N) for t, tpl in enumerate(ASKED)]


def unseen():
    return [(NEW.format(alias(i)), f"d{i}") for i in range(N)]


def mrr(kb, mode, pairs=None):
    out = []
    for q, doc in pairs or unseen():
        hits = kb.search(q, k=10, mode=mode, log=False, include_units=False).hits
        out.append(next((1 / h.rank for h in hits if h.doc_id == doc), 0.0))
    return float(np.mean(out))


@pytest.fixture
def hall(tmp_path, kb_config):
    k = KnowledgeBase.create(tmp_path / "kb", embedder="hash", notify=lambda m: None, config=kb_config)
    k.ingest(DOCS)
    yield k
    k.close()


def test_learning_helps_questions_nobody_asked_and_is_adopted(hall):
    before = {m: mrr(hall, m) for m in ("bm25", "dense", "hybrid")}
    hall.label(labels(), k=5)
    rep = hall.writeback()
    t = rep["tuning"]
    assert t["status"] == "adopted", t
    assert t["examples"] + t["holdout"] == N * len(ASKED)
    assert t["holdout"] == sum(in_holdout(ex["query"], 0.2) for ex in labels())
    assert t["metrics"]["candidate"]["dense"] > t["metrics"]["current"]["dense"]
    after = {m: mrr(hall, m) for m in ("bm25", "dense", "hybrid")}
    assert before["dense"] < 0.2 and after["dense"] > before["dense"] + 0.15, (before, after)
    assert after["hybrid"] > before["hybrid"] + 0.15, (before, after)
    assert after["bm25"] == pytest.approx(before["bm25"], abs=1e-9)  # BM25 has no query vector to adapt
    [row] = hall.tunings()
    assert row["status"] == "adopted" and row["adapter"] and row["run_id"] == rep["run_id"]
    assert hall.runs()[-1]["counts"]["tuning"] == "adopted"
    assert hall.stats()["tuning"] == row["id"]
    res = hall.search(NEW.format(alias(3)), k=3)
    params = json.loads(hall.conn.execute("SELECT params FROM queries WHERE id=?", (res.query_id,)).fetchone()[0])
    assert params["tuning"] == row["id"]
    # retrieval.learned = false searches as before any learning
    hall.config["retrieval"]["learned"] = False
    assert mrr(hall, "dense") == pytest.approx(before["dense"])


def test_a_fit_worse_on_the_held_out_feedback_is_kept_inactive(hall):
    """The questions learned from point at the wrong documents; the held-out ones at the right ones."""
    before = [h.chunk_id for q, _ in unseen() for h in hall.search(q, k=5, mode="hybrid", log=False, include_units=False).hits]
    hall.label(labels(lambda i, q: f"d{i}" if in_holdout(q, 0.2) else f"d{(i + 1) % N}"), k=5)
    dense_before = [h.chunk_id for q, _ in unseen() for h in hall.search(q, k=5, mode="dense", log=False, include_units=False).hits]
    rep = hall.writeback()
    t = rep["tuning"]
    # the adapter learned the wrong documents: it is not used. The fusion weights (chosen without it) may be
    # adopted for hybrid search alone, only when the held-out feedback says they are better there
    assert [h.chunk_id for q, _ in unseen() for h in hall.search(q, k=5, mode="dense", log=False, include_units=False).hits] == dense_before
    after = [h.chunk_id for q, _ in unseen() for h in hall.search(q, k=5, mode="hybrid", log=False, include_units=False).hits]
    if t["status"] == "inactive":
        assert "worse" in t["reason"] and hall.stats()["tuning"] is None and after == before
        assert t["metrics"]["candidate"]["dense"] < t["metrics"]["current"]["dense"]
        assert hall.tunings()[0]["status"] == "inactive"
    else:
        assert "hybrid search" in t["reason"] and not t["adapter"] and not t["hybrid_adapter"]
        assert t["metrics"]["candidate"]["dense"] == t["metrics"]["current"]["dense"]
        assert t["metrics"]["candidate"]["hybrid"] > t["metrics"]["current"]["hybrid"]


def test_rollback_returns_to_the_tuning_adopted_before(hall):
    hall.config["learning"]["min_holdout"] = 10  # each night holds out 13-14 of its questions
    static = mrr(hall, "dense")
    hall.label(labels()[: N * 3], k=5)
    first = hall.writeback()
    assert first["tuning"]["status"] == "adopted"
    one = mrr(hall, "dense")
    hall.label(labels()[N * 3:], k=5)
    second = hall.writeback()
    assert second["tuning"]["status"] == "adopted"
    two = mrr(hall, "dense")
    assert one > static and two != one
    hall.rollback(second["run_id"])
    assert [r["status"] for r in hall.tunings()] == ["adopted", "rolled-back"]
    assert mrr(hall, "dense") == pytest.approx(one)
    hall.rollback(first["run_id"])
    assert hall.stats()["tuning"] is None
    assert mrr(hall, "dense") == pytest.approx(static)


def test_a_tuning_adopted_or_rolled_back_reaches_a_process_that_searched_before_it(hall):
    """Adopting or rolling back a tuning moves the log's head, even in a run that changes no chunks, so a
    process that cached the tuning it searched with reads it again."""
    from writeback_rag import store, tuning

    watcher = KnowledgeBase.open(hall.path, notify=lambda m: None)
    q = "north hall keeper"
    def cosines():
        return sorted(round(h.dense, 5) for h in watcher.search(q, k=len(DOCS), mode="dense", log=False).hits)

    static = cosines()
    dim = len(hall.embedder.encode(["x"])[0])
    report = {"id": "tuning:flip", "status": "adopted", "bm25_weight": 1.0, "rrf_k": 60, "hybrid_adapter": False,
              "examples": 1, "holdout": 1, "metrics": {}, "reason": "a test"}
    gen = hall.stats()["generation"]
    with store.transaction(hall.conn):  # an adapter that turns every query vector around
        tuning.record(hall.conn, report, ("flip", hall.model_id, dim, -2 * np.eye(dim, dtype=np.float32), {}, None))
    assert hall.stats()["generation"] == gen + 1
    assert cosines() == sorted(-c for c in static) != static and watcher.stats()["tuning"] == "tuning:flip"
    with store.transaction(hall.conn):
        assert tuning.rollback(hall.conn, "flip") == 1
    assert hall.stats()["generation"] == gen + 2
    assert cosines() == static
    with store.transaction(hall.conn):
        assert tuning.rollback(hall.conn, "flip") == 0  # already rolled back: nothing changes
    assert hall.stats()["generation"] == gen + 2
    watcher.close()


def test_learning_waits_for_enough_feedback_and_can_be_turned_off(hall, tmp_path):
    hall.label(labels()[:10], k=5)
    rep = hall.writeback()
    assert rep["tuning"]["status"] == "skipped" and "need 50" in rep["tuning"]["reason"]
    assert hall.tunings() == [] and hall.runs()[-1]["counts"]["tuning"] == "skipped"
    hall.config["learning"]["enabled"] = False
    hall.label(labels(), k=5)
    assert hall.writeback()["tuning"]["status"] == "off"
    assert hall.tunings() == []


def test_cli_shows_what_was_learned(hall):
    path = hall.path
    hall.label(labels(), k=5)
    hall.close()
    r = CliRunner().invoke(app, ["writeback", "--kb", path, "--quiet"])
    assert r.exit_code == 0, r.output
    assert "learning: adopted (held-out nDCG@10 hybrid" in r.output
    r = CliRunner().invoke(app, ["tunings", "--kb", path])
    assert r.exit_code == 0 and "adopted" in r.output and "adapter=yes" in r.output, r.output
    r = CliRunner().invoke(app, ["runs", "--kb", path])
    assert "tuning=adopted" in r.output, r.output


def test_fusion_weights_and_adapter_arithmetic():
    bm, dn = {1: 9.0, 2: 5.0}, {2: 0.9, 3: 0.8}
    plain = fuse(bm, dn, "hybrid", "rrf", 60)
    assert plain[2] == pytest.approx(1 / 62 + 1 / 61) and plain[1] == pytest.approx(1 / 61)
    leaning = fuse(bm, dn, "hybrid", "rrf", 10, bm25_weight=0.8)
    assert leaning[1] == pytest.approx(1.6 / 11) and leaning[3] == pytest.approx(0.4 / 12)
    t = Tuning("x", np.eye(2, dtype=np.float32))
    v = t.adapt(np.array([3.0, 4.0], dtype=np.float32))
    assert np.allclose(v, [0.6, 0.8]) and Tuning().adapt(v) is v
    assert in_holdout("Where is  the quillan1y kept", 0.5) == in_holdout("where is the quillan1y KEPT", 0.5)


def test_the_canary_adopts_a_fit_whole_or_in_part_only_where_the_held_out_feedback_says_so():
    now = {"dense": 0.5, "hybrid": 0.6}
    with_adapter = Tuning("t", np.zeros((2, 2), np.float32), 0.5, 60, True)  # hybrid uses it too
    assert decide(now, {"dense": 0.5, "hybrid": 0.6}, True, True, UNTUNED)[0] == "all"  # ties: not worse
    assert decide(now, {"dense": 0.7, "hybrid": 0.59}, True, True, UNTUNED)[0] == "dense"
    # dense-only needs an adapter, and hybrid that uses no adapter now (else hybrid would change)
    assert decide(now, {"dense": 0.7, "hybrid": 0.59}, False, False, UNTUNED)[0] is None
    assert decide(now, {"dense": 0.7, "hybrid": 0.59}, True, True, with_adapter)[0] is None
    assert decide(now, {"dense": 0.4, "hybrid": 0.65}, True, False, UNTUNED)[0] == "hybrid"
    # hybrid-only needs a fusion that does not use the new adapter, and a strict gain
    assert decide(now, {"dense": 0.4, "hybrid": 0.65}, True, True, UNTUNED)[0] is None
    assert decide(now, {"dense": 0.4, "hybrid": 0.6}, True, False, UNTUNED)[0] is None
    verdict, reason = decide(now, {"dense": 0.4, "hybrid": 0.5}, True, False, UNTUNED)
    assert verdict is None and "kept inactive" in reason


# ---- the canary for units: a second corpus where each thing has a place and a painter --------------------

PLACES = [{"id": f"a{i}", "title": f"Item a{i}", "text": f"The zorbel{i}x is kept in the north hall."} for i in range(N)]
PAINTERS = [{"id": f"b{i}", "title": f"Painting b{i}", "text": f"The zorbel{i}x was painted by Marla Quent in spring."}
            for i in range(N)]
KEPT = ("where is the zorbel{}x kept", "in which hall is the zorbel{}x kept", "is the zorbel{}x kept in the north")
PAINTED = ("who painted the zorbel{}x", "when was the zorbel{}x painted", "which painter made the zorbel{}x picture",
           "by whom was the zorbel{}x painted")


def slice_labels(templates, doc, held):
    """Labelled questions whose text falls in the held-out slice (held=True) or outside it."""
    return [{"id": f"{doc}{i}-{t}", "query": tpl.format(i), "relevant": [f"{doc}{i}"]}
            for i in range(N) for t, tpl in enumerate(templates) if in_holdout(tpl.format(i), 0.2) == held]


@pytest.fixture
def places(tmp_path, kb_config):
    k = KnowledgeBase.create(tmp_path / "kb", embedder="hash", notify=lambda m: None, config=kb_config)
    k.ingest(PLACES + PAINTERS)
    k.config["learning"].update(min_examples=10, min_holdout=5)
    # the sources alone already rank each question's passage first: without this no question would need
    # a unit (the slot check has its own tests); these tests are about judging the units there are
    k.config["writeback"]["earn_slot"] = False
    yield k
    k.close()


def unit_kinds(kb, q, mode, **kw):
    return [h.kind for h in kb.search(q, k=5, mode=mode, log=False, **kw).hits]


def verdict_follows_the_figures(u):
    """Off exactly where units are worse beyond noise: the paired difference's 95% interval below zero."""
    for m, f in u["metrics"].items():
        assert f["delta"] == pytest.approx(f["with"] - f["without"], abs=2e-4)
        assert (m in u["off"]) == (f["ci95"][1] < 0) and f["ci95"][0] <= f["delta"] <= f["ci95"][1], (m, f)


def test_units_are_left_out_of_the_modes_where_the_held_out_questions_rank_worse_with_them(places):
    kb = places
    # night 1: units of the place passages, judged by held-out questions on the same passages. In BM25 a
    # question's own unit is left out and its passage comes first: not worse
    kb.label(slice_labels(KEPT, "a", held=False) + slice_labels(KEPT, "a", held=True), k=5)
    one = kb.writeback()
    u1 = one["unit_use"]
    assert one["written"] > 0 and u1["status"] == "judged" and "bm25" not in u1["off"], u1
    # the held-out questions judge the units, so none of them is in one
    held = {l["query"] for l in slice_labels(KEPT, "a", held=True)}
    assert one["held_out"] == len(held) > 0
    asked = {q["text"] for u in kb.units() for q in kb.conn.execute(
        f"SELECT text FROM queries WHERE id IN ({','.join(map(str, u['query_ids']))})")}
    assert asked and not asked & held
    verdict_follows_the_figures(u1)
    assert kb.stats()["units_off"] == u1["off"]
    ask = KEPT[0].format(next(i for i in range(N) if not in_holdout(KEPT[0].format(i), 0.2)))
    assert "unit" in unit_kinds(kb, ask, "bm25")
    # night 2: questions about the painters join the held-out slice. A place unit now takes the first slot
    # above the painting they ask about: worse, in BM25 too
    kb.label(slice_labels(PAINTED, "b", held=True), k=5)
    two = kb.writeback()
    u = two["unit_use"]
    assert u["status"] == "judged" and "bm25" in u["off"] and u["holdout"] > u1["holdout"], u
    verdict_follows_the_figures(u)
    assert kb.stats()["units_off"] == u["off"]
    for mode in u["off"]:
        assert "unit" not in unit_kinds(kb, ask, mode), mode
    assert "unit" in unit_kinds(kb, ask, "bm25", max_units=1)  # asked for explicitly: still there
    # another process sees the verdict; `wbrag runs` shows it
    other = KnowledgeBase.open(kb.path, notify=lambda m: None)
    assert "unit" not in unit_kinds(other, ask, "bm25")
    other.close()
    r = CliRunner().invoke(app, ["runs", "--kb", kb.path])
    assert f"units_off={','.join(u['off'])}" in r.output, r.output
    # rolling night 2 back restores night 1's verdict
    kb.rollback(two["run_id"])
    assert kb.stats()["units_off"] == u1["off"]
    assert "unit" in unit_kinds(kb, ask, "bm25")
    assert kb.check()["ok"]


def test_units_are_judged_only_with_enough_held_out_feedback(places):
    places.config["learning"]["min_holdout"] = 1000
    places.label(slice_labels(KEPT, "a", held=False) + slice_labels(PAINTED, "b", held=True), k=5)
    rep = places.writeback()
    assert rep["unit_use"]["status"] == "skipped" and "need 1000" in rep["unit_use"]["reason"]
    assert places.stats()["units_off"] == []


def test_a_new_units_verdict_reaches_a_process_that_searched_before_it(places):
    """The verdict moves the log's head, so a process that cached the old one reads it again."""
    from writeback_rag import store
    from writeback_rag.tuning import set_units_off

    places.label(slice_labels(KEPT, "a", held=False), k=5)
    places.writeback()
    watcher = KnowledgeBase.open(places.path, notify=lambda m: None)
    ask = slice_labels(KEPT, "a", held=False)[0]["query"]
    assert "unit" in unit_kinds(watcher, ask, "bm25")
    gen = places.stats()["generation"]
    with store.transaction(places.conn):
        set_units_off(places.conn, ["bm25"])
    assert places.stats()["generation"] == gen + 1
    assert "unit" not in unit_kinds(watcher, ask, "bm25") and "unit" in unit_kinds(watcher, ask, "hybrid")
    with store.transaction(places.conn):
        set_units_off(places.conn, ["bm25"])  # the same verdict again: nothing changes
    assert places.stats()["generation"] == gen + 1
    watcher.close()


def test_the_units_canary_scores_by_the_answer_where_it_is_known(places):
    """Labelled answers: a held-out question scores the reciprocal rank of the first hit holding its answer
    (a unit's text counts), so a unit that carries the answer on its first line is not worse."""
    kb = places
    ans = lambda l: dict(l, answers=["north hall"])  # noqa: E731
    kb.label([ans(l) for l in slice_labels(KEPT, "a", held=False) + slice_labels(KEPT, "a", held=True)], k=5)
    u = kb.writeback()["unit_use"]
    assert u["status"] == "judged" and "bm25" not in u["off"], u
    verdict_follows_the_figures(u)
    # every place passage and every unit holds "north hall": with a unit first, each held-out question finds
    # it at rank 1; without, a painting sometimes comes first
    assert u["metrics"]["bm25"]["with"] == 1.0 >= u["metrics"]["bm25"]["without"]
    # questions about the paintings whose labelled answer nothing holds score 0 with units and without, even
    # though their relevant painting ranks first (by documents they would score 1)
    kb.label([dict(l, answers=["nowhere at all"]) for l in slice_labels(PAINTED, "b", held=True)], k=5)
    u2 = kb.writeback()["unit_use"]
    verdict_follows_the_figures(u2)
    for key in ("with", "without"):
        assert u2["metrics"]["bm25"][key] * u2["holdout"] == pytest.approx(u["metrics"]["bm25"][key] * u["holdout"],
                                                                          abs=1e-2)


def test_a_night_that_fails_or_dies_while_judging_its_units_leaves_no_tuning_in_use(hall, monkeypatch, tmp_path):
    """The tuning is stored before the units are judged with it. A run that fails there rolls it back at
    once; one killed there (kill -9) has it rolled back when the night is run again, and fitted again."""
    import subprocess
    import sys

    import writeback_rag.tuning as tuning_mod

    hall.label(labels(), k=5)

    def fails(kb, exs=None):
        raise RuntimeError("the canary's searches failed")

    monkeypatch.setattr(tuning_mod, "judge_units", fails)
    with pytest.raises(RuntimeError):
        hall.writeback()
    [first] = hall.tunings()
    assert first["status"] == "rolled-back" and hall.runs()[-1]["status"] == "failed"
    assert hall.stats()["tuning"] is None
    monkeypatch.undo()
    path = hall.path
    hall.close()
    script = ("import os, sys; sys.path.insert(0, %r)\n"
              "import writeback_rag.tuning as t\n"
              "from writeback_rag import KnowledgeBase\n"
              "t.judge_units = lambda kb, exs=None: os._exit(9)\n"
              "KnowledgeBase.open(%r, notify=lambda m: None).writeback()\n") % (os.path.dirname(os.path.dirname(
                  os.path.abspath(__file__))), path)
    assert subprocess.run([sys.executable, "-c", script], timeout=300).returncode == 9
    kb = KnowledgeBase.open(path, notify=lambda m: None)
    try:
        dead = kb.tunings()[-1]
        assert dead["status"] == "adopted" and kb.runs()[-1]["status"] == "running"
        again = kb.writeback()
        rows = {r["run_id"]: r for r in kb.tunings()}
        assert rows[dead["run_id"]]["status"] == "rolled-back" and rows[again["run_id"]]["status"] == "adopted"
        assert kb.stats()["tuning"] == f"tuning:{again['run_id']}"
        assert [r["status"] for r in kb.runs()] == ["failed", "interrupted", "done"]
        # the same night, fitted again from the same feedback: the same figures
        assert rows[again["run_id"]]["metrics"]["candidate"] == dead["metrics"]["candidate"]
    finally:
        kb.close()


def test_turning_learning_off_clears_the_units_verdict_and_a_units_only_search_keeps_its_units(places):
    places.label(slice_labels(KEPT, "a", held=False) + slice_labels(PAINTED, "b", held=True), k=5)
    u = places.writeback()["unit_use"]
    assert "bm25" in u["off"], u
    ask = slice_labels(KEPT, "a", held=False)[0]["query"]
    assert "unit" not in unit_kinds(places, ask, "bm25")
    assert set(unit_kinds(places, ask, "bm25", filters={"kind": "unit"})) == {"unit"}  # asked for units only
    places.config["learning"]["enabled"] = False
    assert places.writeback()["unit_use"]["status"] == "off"
    assert places.stats()["units_off"] == [] and "unit" in unit_kinds(places, ask, "bm25")
