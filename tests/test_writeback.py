"""Feedback, gates, distillers, units, the job's safety (lock, kill -9, rollback, staleness)."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import QUESTIONS, write
from writeback_rag import KnowledgeBase
from writeback_rag.errors import InputError, LLMError, LockBusy, UnknownQuery
from writeback_rag.feedback import judge, read_labels
from writeback_rag.index import BM25
from writeback_rag.writeback import Lock, extractive, faithful, list_runs, list_units

BACKENDS = ["embedded", "milvus"]  # every test that builds a KB runs on both (conftest.pytest_generate_tests)

DOCS = [
    {"id": "heron", "title": "Grey Heron Light", "text": "Grey Heron Light was completed in 1861. Its lens was made "
     "by the Calder foundry. The tower is painted white with one black band. Herons fish on the rocks nearby."},
    {"id": "calder", "title": "Calder Foundry", "text": "The Calder foundry stood in the town of Marrowick. It cast "
     "bells, railings and lighthouse lenses. The foundry closed in 1931 after a fire."},
    {"id": "gale", "title": "The Great Gale", "text": "The great gale of 1894 wrecked eleven ships. Keepers at "
     "Inchmurra logged winds of record strength. The supply boat was lost."},
]


@pytest.fixture
def small(kb):
    """Three documents, where the right one is usually ranked first already: these tests write a unit for
    every question (earn_slot off); the slot check has its own tests."""
    kb.ingest(DOCS)
    kb.config["writeback"]["earn_slot"] = False
    return kb


def labelled(kb, query, answers, relevant=(), k=3):
    return kb.label([{"id": "x", "query": query, "answers": list(answers), "relevant": list(relevant)}], k=k)


def test_feedback_validation(small):
    res = small.search("Calder foundry town", k=2)
    with pytest.raises(UnknownQuery):
        small.feedback(999, correct=True)
    with pytest.raises(InputError, match="not among the hits"):
        small.feedback(res.query_id, correct=True, docs=["gale-not-retrieved"])
    fid = small.feedback(res.query_id, correct=True, docs=[res.hits[0].doc_id], answer="Marrowick", source="app")
    fid2 = small.feedback(res.query_id, correct=False, source="user")
    rec = small.query_record(res.query_id)
    assert [f["id"] for f in rec["feedback"]] == [fid, fid2]
    assert rec["feedback"][0]["source"] == "app" and rec["feedback"][0]["answer"] == "Marrowick"


def test_retrieval_judge_gates_and_fallback(small):
    ex = {"query": "In which town was the Calder foundry?", "answers": ["Marrowick"], "relevant": []}
    hits = small.search(ex["query"], k=3, log=False).hits
    j = judge(small, ex, hits)
    assert j["useful"] and j["s_rag"] == 1.0 and j["s_nr"] == 0.0
    assert [d for d, s, p in j["docs"] if p] == ["calder"]
    miss = judge(small, {"query": "gale", "answers": ["Zanzibar"], "relevant": []}, hits)
    assert not miss["useful"] and miss["docs"] == []
    # relevant labels pass the gate even when the answer string is absent
    rel = judge(small, {"query": "x", "answers": [], "relevant": ["heron"]}, hits)
    assert rel["useful"] and [d for d, _, p in rel["docs"] if p] == ["heron"]


def test_llm_judge_uses_paper_gates(small, scripted):
    small.config["llm"] = {"backend": "scripted"}
    ex = {"query": "In which town was the Calder foundry?", "answers": ["Marrowick"], "relevant": []}
    hits = small.search(ex["query"], k=3, log=False).hits
    # G(q) alone is wrong; with the Calder document in context it is right
    scripted.rules = [("town of Marrowick", "Marrowick"), ("Question:", "London")]
    j = judge(small, ex, hits, small.llm)
    assert j["judge"] == "llm" and j["s_nr"] == 0.0 and j["s_rag"] == 1.0 and j["useful"]
    assert {d: p for d, _, p in j["docs"]} == {"calder": True, **{h.doc_id: False for h in hits if h.doc_id != "calder"}}
    # no per-document gain: fall back to the top 2 by rank
    scripted.rules = [("Context:\n[1]", lambda p: "Marrowick" if "[2]" in p else "London"), ("Question:", "London")]
    j = judge(small, ex, hits, small.llm)
    assert j["useful"] and [d for d, _, p in j["docs"] if p] == [h.doc_id for h in hits[:2]]
    # the model knows it without retrieval: the utility gate fails
    scripted.rules = [("Question:", "Marrowick")]
    assert not judge(small, ex, hits, small.llm)["useful"]


def test_extractive_distiller_budget_dedup_and_answer(small):
    docs = [small.document("heron"), small.document("calder"), small.document("calder")]
    title, text, _ = extractive(small, [{"query": "Where was the lens of Grey Heron made?", "answers": ["Marrowick"]}], docs)
    assert title == "Where was the lens of Grey Heron made?"
    assert "Marrowick" in text and text.count("stood in the town of Marrowick") == 1
    small.config["writeback"]["budget_tokens"] = 12
    _, short, _ = extractive(small, [{"query": "Where was the lens of Grey Heron made?", "answers": ["Marrowick"]}], docs)
    assert short == "The Calder foundry stood in the town of Marrowick."
    small.config["writeback"]["include_query"] = False
    assert extractive(small, [{"query": "q"}], docs)[0] == "Grey Heron Light"


def test_faithfulness_guard():
    docs = [{"title": "A", "text": "The lens was made in Marrowick by the Calder foundry."}]
    assert faithful("The Calder foundry made the lens in Marrowick.", docs, 0.6)[0]
    ok, support = faithful("The lens was made in Paris by Gustave Eiffel in 1889.", docs, 0.6)
    assert not ok and support < 0.6


def test_writeback_writes_units_with_provenance_and_is_idempotent(small):
    rep = labelled(small, "In which town was the Calder foundry?", ["Marrowick"])
    qid = rep["query_ids"][0]
    out = small.writeback()
    assert out["written"] == 1 and out["passed_utility"] == 1
    [u] = list_units(small)
    assert u["source_doc_ids"] == ["calder"] and u["query_ids"] == [qid] and u["run_id"] == out["run_id"]
    assert u["distiller"] == "extractive" and u["source_chunk_ids"] and u["feedback_ids"]
    assert "Marrowick" in u["text"] and u["status"] == "active"
    assert small.writeback()["examples"] == 0  # watermark: nothing new
    # the same question labelled again: same unit id, merged, not duplicated
    labelled(small, "In which town was the Calder foundry?", ["Marrowick"])
    again = small.writeback()
    assert again["merged"] == 1 and again.get("written", 0) == 0
    [u] = list_units(small)
    assert len(u["query_ids"]) == 2
    hits = small.search("Calder foundry town", k=5, log=False).hits
    assert any(h.kind == "unit" for h in hits)
    assert all(h.kind == "source" for h in small.search("Calder foundry town", k=5, include_units=False, log=False).hits)
    assert small.check()["counts"]["indexed_chunks"] == small.conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]


def test_dry_run_writes_nothing(small):
    labelled(small, "In which town was the Calder foundry?", ["Marrowick"])
    out = small.writeback(dry_run=True)
    assert out["written"] == 1 and out["run_id"] is None and out["units"][0]["sources"] == ["calder"]
    assert list_units(small) == [] and list_runs(small) == []
    assert small.writeback()["written"] == 1


def test_user_feedback_without_docs_and_min_support(small):
    small.config["writeback"]["min_support"] = 2
    res = small.search("Where was the foundry that made the Grey Heron lens?", k=3)
    small.feedback(res.query_id, correct=True, answer="Marrowick")
    out = small.writeback()
    assert out.get("written", 0) == 0 and out.get("passed_utility", 0) == 0
    gates = small.query_record(res.query_id)["gates"]
    assert gates[-1]["gate"] == "utility" and "min_support" in gates[-1]["reason"]
    small.feedback(res.query_id, correct=True)
    out = small.writeback()
    assert out["written"] == 1
    [u] = list_units(small)
    assert u["source_doc_ids"] == ["calder"]  # the hit holding the user's answer


def test_wrong_feedback_retires_unit(small):
    small.config["writeback"]["retire_after_wrong"] = 2
    labelled(small, "In which town was the Calder foundry?", ["Marrowick"])
    small.writeback()
    [u] = list_units(small)
    for i in range(2):
        res = small.search("Calder foundry town", k=5)
        assert any(h.doc_id == u["id"] for h in res.hits)
        small.feedback(res.query_id, correct=False, docs=[u["id"]])
    [u] = list_units(small)
    assert u["status"] == "retired" and u["against"] == 2
    assert all(h.kind == "source" for h in small.search("Calder foundry town", k=5, log=False).hits)


def test_rollback_removes_units_everywhere(small):
    labelled(small, "In which town was the Calder foundry?", ["Marrowick"])
    run = small.writeback()["run_id"]
    n_chunks = small.check()["counts"]["indexed_chunks"]
    assert small.rollback(run) == 1
    rep = small.check()
    assert list_units(small) == [] and rep["ok"] and rep["counts"]["indexed_chunks"] == n_chunks - 1
    assert all(h.kind == "source" for h in small.search("Calder foundry Marrowick", k=5, log=False).hits)
    assert [r["status"] for r in list_runs(small)] == ["rolled-back"]
    assert small.writeback()["examples"] == 0  # rolled-back feedback is not replayed
    with pytest.raises(InputError):
        small.rollback("nope")


def test_stale_units_hidden_then_redistilled(small, backend):
    # enough other text that a unit's removal leaves tombstones behind (no compaction)
    small.ingest([{"id": f"filler{i}", "text": f"Filler note {i} on tides, gulls, ferries and harbour walls."}
                  for i in range(60)])
    labelled(small, "In which town was the Calder foundry?", ["Marrowick"])
    small.writeback()
    [u] = list_units(small)
    changed = dict(DOCS[1], text=DOCS[1]["text"].replace("It cast bells", "It cast anchors"))
    small.ingest([changed])
    [u] = list_units(small)
    assert u["status"] == "stale"
    assert all(h.kind == "source" for h in small.search("Calder foundry Marrowick", k=5, log=False).hits)
    out = small.writeback()  # the distilled sentences did not change: the same unit is current again
    assert out["revived"] == 1 and list_units(small)[0]["status"] == "active"
    # rolling the reviving run back leaves the unit as it was (stale), not deleted; the next night revives it
    assert small.rollback(out["run_id"]) == 0 and [x["status"] for x in list_units(small)] == ["stale"]
    out = small.writeback()
    assert out["revived"] == 1 and list_units(small)[0]["status"] == "active"
    # the revived unit's chunks come back under their old ids: each scored once, as a fresh engine does
    hits = small.search("Calder foundry Marrowick bells", k=5, mode="bm25", log=False).hits
    assert any(h.kind == "unit" for h in hits) and len({h.chunk_id for h in hits}) == len(hits)
    if backend == "embedded":
        fresh = BM25(small.records)
        ids, scores = fresh.search("Calder foundry Marrowick bells", 50)
        want = dict(zip(ids.tolist(), scores.tolist()))
        assert all(h.bm25 == pytest.approx(want[h.chunk_id], rel=1e-5) for h in hits)
    changed = dict(DOCS[1], text=DOCS[1]["text"].replace("stood in", "was built in"))
    small.ingest([changed])
    assert list_units(small)[0]["status"] == "stale"
    out = small.writeback()
    assert out["written"] == 1
    statuses = sorted(x["status"] for x in list_units(small))
    assert statuses == ["active", "stale"]
    small.delete(["calder"])
    assert all(x["status"] != "active" for x in list_units(small))


def test_lock_refuses_a_second_run(small):
    with Lock(small):
        with pytest.raises(LockBusy, match="another write-back run"):
            small.writeback()
    from typer.testing import CliRunner
    from writeback_rag.cli import app

    with Lock(small):
        r = CliRunner().invoke(app, ["writeback", "--kb", small.path])
    assert r.exit_code == 75 and "another write-back run" in r.output
    # a rollback waits for the night too: the night works from the units it planned on
    labelled(small, "In which town was the Calder foundry?", ["Marrowick"])
    run = small.writeback()["run_id"]
    with Lock(small):
        with pytest.raises(LockBusy, match="another write-back run"):
            small.rollback(run)
    assert len(list_units(small)) == 1 and small.rollback(run) == 1


def test_llm_distiller_and_faithfulness_rejection(small, scripted):
    small.config["llm"] = {"backend": "scripted"}
    labelled(small, "In which town was the Calder foundry?", ["Marrowick"])
    scripted.rules = [("Reply with their numbers", "1"),
                      ("Rewrite the evidence", "Title: Calder Foundry\nThe Calder foundry stood in the town of Marrowick."),
                      ("Question:", "London")]
    # with an LLM configured the label run used the LLM judge: G(q,docs) says London, so the gate failed
    assert small.writeback(distiller="llm").get("written", 0) == 0
    scripted.rules.insert(0, ("Context:", lambda p: "Marrowick" if "town of Marrowick" in p else "London"))
    labelled(small, "In which town was the Calder foundry?", ["Marrowick"])
    out = small.writeback(distiller="llm")
    assert out["written"] == 1
    [u] = list_units(small)
    assert u["distiller"] == "llm" and u["model"] == "scripted" and "Marrowick" in u["text"]
    # a hallucinating distiller is rejected and logged, nothing written
    scripted.rules[2] = ("Rewrite the evidence", "Title: X\nThe foundry was founded by Napoleon on Mars in 1492.")
    res = labelled(small, "Which town had the Calder foundry in it?", ["Marrowick"])
    out = small.writeback(distiller="llm")
    assert out["rejected"] == 1 and out.get("written", 0) == 0 and len(list_units(small)) == 1
    gates = small.query_record(res["query_ids"][0])["gates"]
    assert any(g["gate"] == "faithfulness" and not g["passed"] for g in gates)


class _FakeOpenAI(BaseHTTPRequestHandler):
    reply = b""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(type(self).reply)

    def log_message(self, *a):
        pass


@pytest.fixture
def http_llm():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.shutdown()


def test_openai_backend_over_loopback_http(small, http_llm):
    url = f"http://127.0.0.1:{http_llm.server_address[1]}/v1"
    small.config["llm"] = {"backend": "openai", "base_url": url, "model": "m"}
    _FakeOpenAI.reply = json.dumps({"choices": [{"message": {"content": "Marrowick"}}]}).encode()
    out = small.answer("In which town was the Calder foundry?", k=2)
    assert out["answer"] == "Marrowick" and small.query_record(out["query_id"])["answer"] == "Marrowick"
    _FakeOpenAI.reply = b"<html>garbage</html>"
    small._llm = None
    with pytest.raises(LLMError, match="malformed response"):
        small.answer("anything")


def test_llm_server_down_fails_cleanly(small):
    small.config["llm"] = {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "timeout": 2}
    small.config["writeback"]["min_support"] = 1
    res = small.search("Calder foundry town", k=3)
    small.feedback(res.query_id, correct=True, docs=["calder"])
    with pytest.raises(LLMError, match="cannot reach LLM server"):
        small.writeback(distiller="llm")
    assert list_units(small) == []
    assert [r["status"] for r in list_runs(small)] == ["failed"]
    small.config["llm"] = {"backend": ""}
    small._llm = None
    assert small.writeback()["written"] == 1  # the feedback was not consumed by the failed run


def test_label_file_errors(tmp_path, small):
    with pytest.raises(InputError, match="l.jsonl:2: malformed JSON"):
        read_labels(write(tmp_path / "l.jsonl", '{"query": "a", "answers": ["b"]}\n{oops\n'))
    with pytest.raises(InputError, match="no labelled examples"):
        read_labels(write(tmp_path / "e.jsonl", "\n"))
    with pytest.raises(InputError, match="needs 'answers' or 'relevant'"):
        read_labels(write(tmp_path / "n.jsonl", '{"query": "a"}\n'))
    with pytest.raises(InputError, match="empty labelled set"):
        small.label([])
    assert len(read_labels(QUESTIONS, split="test")) == 20


SLOW_RUN = """
import sys, time
from writeback_rag import KnowledgeBase
from writeback_rag.writeback import DISTILLERS, register_distiller, extractive
@register_distiller("extractive")
def slow(kb, asks, d):
    time.sleep(0.15)
    return extractive(kb, asks, d)
kb = KnowledgeBase.open(sys.argv[1])
kb.config["writeback"]["batch"] = 2  # commit often, so the kill lands between commits
print(kb.writeback())
"""


def test_kill_minus_9_mid_run_then_resume(tmp_path, corpus_kb):
    kb = corpus_kb
    kb.label(QUESTIONS, split="train")
    kb.close()
    script = write(tmp_path / "slow.py", SLOW_RUN)
    proc = subprocess.Popen([sys.executable, script, kb.path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = os.path.join(kb.path, "kb.sqlite")
    deadline = time.time() + 60
    while time.time() < deadline:
        if sqlite3.connect(db, timeout=30).execute("SELECT COUNT(*) FROM units").fetchone()[0] >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    k = KnowledgeBase.open(kb.path, notify=lambda m: None)
    partial = len(list_units(k))
    assert [r["status"] for r in list_runs(k)] == ["running"]
    out = k.writeback()
    units = list_units(k)
    # the resumed run undoes what the killed one wrote and writes the whole night again; it owns every unit
    assert 5 <= partial < len(units) and out["written"] == len(units)
    assert {u["run_id"] for u in units} == {out["run_id"]} and all(u["status"] == "active" for u in units)
    assert len({u["anchor"] for u in units}) == len(units)  # one unit per source passage
    statuses = [r["status"] for r in list_runs(k)]
    assert statuses == ["interrupted", "done"]
    rep = KnowledgeBase.open(kb.path, notify=lambda m: None).check()
    assert rep["ok"] and rep["counts"]["indexed_chunks"] == k.conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    assert k.writeback()["examples"] == 0


def test_label_beir_folder(tmp_path, small):
    folder = tmp_path / "beir"
    write(folder / "queries.jsonl", json.dumps({"_id": "q1", "text": "Calder foundry town"}) + "\n"
          + json.dumps({"_id": "q2", "text": "great gale ships"}) + "\n")
    write(folder / "qrels" / "train.tsv", "query-id\tcorpus-id\tscore\nq1\tcalder\t1\n")
    rep = small.label(str(folder), split="train")
    assert rep["examples"] == 1 and rep["useful"] == 1
    with pytest.raises(InputError, match="qrels/test.tsv"):
        small.label(str(folder), split="test")
    write(folder / "qrels" / "dev.tsv", "query-id\tcorpus-id\tscore\nq1 calder\n")
    with pytest.raises(InputError, match=r"dev.tsv:2: expected"):
        small.label(str(folder), split="dev")


def test_beir_folder_missing_or_bad_queries(tmp_path, small):
    folder = tmp_path / "b"
    write(folder / "qrels" / "train.tsv", "query-id\tcorpus-id\tscore\nq1\tcalder\t1\n")
    with pytest.raises(InputError, match="queries.jsonl: cannot read"):
        small.label(str(folder))
    write(folder / "queries.jsonl", json.dumps({"id": "q1", "text": "x"}) + "\n")
    with pytest.raises(InputError, match="record 1: needs '_id' and 'text'"):
        small.label(str(folder))


def test_max_units_caps_unit_slots(small):
    labelled(small, "In which town was the Calder foundry?", ["Marrowick"])
    labelled(small, "Which foundry made the lens of Grey Heron Light?", ["Calder foundry"])
    small.writeback()
    assert len(list_units(small)) >= 2
    free = small.search("Calder foundry town Marrowick", k=5, max_units=-1, log=False).hits
    assert sum(h.kind == "unit" for h in free) >= 2
    capped = small.search("Calder foundry town Marrowick", k=5, max_units=1, log=False).hits
    assert sum(h.kind == "unit" for h in capped) == 1 and len(capped) == len(DOCS) + 1  # sources fill the rest
    small.config["retrieval"]["max_units"] = 0
    assert all(h.kind == "source" for h in small.search("Calder foundry town", k=5, log=False).hits)


def test_unit_fusion_separate_keeps_the_static_source_ranking(small):
    for q in ["In which town was the Calder foundry?", "Which town had the Calder foundry?",
              "When did the Calder foundry close?"]:
        labelled(small, q, ["Marrowick", "1931"])
    small.writeback()
    q = "Calder foundry town Marrowick"
    static = [h.chunk_id for h in small.search(q, k=10, mode="hybrid", include_units=False, log=False).hits]
    small.config["retrieval"].update(unit_fusion="separate", max_units=-1)
    hits = small.search(q, k=10, mode="hybrid", log=False).hits
    assert any(h.kind == "unit" for h in hits)
    assert [h.chunk_id for h in hits if h.kind == "source"] == static[:sum(h.kind == "source" for h in hits)]
    with pytest.raises(InputError, match="retrieval.unit_fusion = \"paper\": expected one of joint, separate"):
        KnowledgeBase.configure(small.path, ["retrieval.unit_fusion=paper"])


def test_dense_queries_never_load_bm25(small, backend):
    """A dense query needs neither the BM25 arrays nor their file, also with units in a separate list."""
    if backend == "milvus":
        pytest.skip("one Milvus collection holds both halves: no BM25 arrays to load")
    labelled(small, "In which town was the Calder foundry?", ["Marrowick"])
    small.writeback()
    kb = KnowledgeBase.open(small.path)
    kb.config["retrieval"].update(unit_fusion="separate", max_units=-1)
    for p in (kb.bm25_path, kb.bm25_path + ".manifest.json"):
        if os.path.exists(p):
            os.remove(p)
    hits = kb.search("Calder foundry town", k=5, mode="dense", log=False).hits
    assert any(h.kind == "unit" for h in hits) and any(h.kind == "source" for h in hits)
    assert kb._bm25 is None and not os.path.exists(kb.bm25_path)
    assert kb.search("Calder foundry town", k=5, mode="bm25", log=False).hits and kb._bm25 is not None


def _night(path):
    """The records a write-back night leaves: units (with provenance) and the gate decisions of its run."""
    k = KnowledgeBase.open(path, notify=lambda m: None)
    done = [r["id"] for r in list_runs(k) if r["status"] == "done"]
    units = list_units(k)
    assert {u["run_id"] for u in units} <= set(done)  # the resumed run owns the whole night's units
    out = ({(u["id"], u["title"], u["text"], u["status"], tuple(u["source_doc_ids"]), tuple(u["query_ids"]),
             tuple(u["feedback_ids"]), u["ended_by"] and done.index(u["ended_by"])) for u in units},
           sorted(tuple(r) for r in k.conn.execute(
               "SELECT query_id, gate, doc_id, passed, reason FROM gate_decisions WHERE run_id=?", (done[-1],))))
    assert k.check()["ok"]
    k.close()
    return out


@pytest.mark.parametrize("kill_after_units,nights", [(0, 1), (3, 1), (8, 1), (2, 2), (8, 2)])
def test_resumed_night_equals_an_uninterrupted_one(tmp_path, corpus_kb, backend, kill_after_units, nights):
    """kill -9 at several points of a write-back run (the first night, or a second one that supersedes and
    retires units of the first); the resumed run ends with exactly the units, statuses, provenance and gate
    decisions of a run that was never interrupted (run on a copy of the same KB)."""
    import shutil

    kb = corpus_kb
    train = read_labels(QUESTIONS, split="train")
    if nights == 2:  # every question gets a unit, so the second night extends (supersedes) the first's
        kb.close()
        KnowledgeBase.configure(kb.path, ["writeback.earn_slot=false"])
        kb = KnowledgeBase.open(kb.path, notify=lambda m: None)
        kb.label(train[::2])
        kb.writeback()
        kb.label(train[1::2])
    else:
        kb.label(train)
    before = len(kb.units())
    kb.close()
    twin = str(tmp_path / "twin")
    shutil.copytree(kb.path, twin)
    if backend == "milvus":  # a copied folder keeps its collection name: the twin gets its own
        KnowledgeBase.configure(twin, ["milvus.collection=twin_" + os.urandom(4).hex()])
        KnowledgeBase.open(twin, notify=lambda m: None).reindex()
    KnowledgeBase.open(twin, notify=lambda m: None).writeback()
    script = write(tmp_path / "slow.py", SLOW_RUN)
    proc = subprocess.Popen([sys.executable, script, kb.path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = os.path.join(kb.path, "kb.sqlite")
    deadline = time.time() + 60
    while time.time() < deadline:
        c = sqlite3.connect(db, timeout=30)
        units = c.execute("SELECT COUNT(*) FROM units").fetchone()[0]
        started = c.execute("SELECT COUNT(*) FROM runs WHERE status='running'").fetchone()[0]
        c.close()
        if (started and units >= before + kill_after_units) or proc.poll() is not None:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    KnowledgeBase.open(kb.path, notify=lambda m: None).writeback()
    (units, gates), (units_twin, gates_twin) = _night(kb.path), _night(twin)
    assert sorted(units - units_twin) == sorted(units_twin - units) == []
    assert gates == gates_twin


def test_the_document_gate_counts_documents_not_chunk_hits(kb):
    """A document whose two chunks both carry the answer is one kept document: one gate row, one entry in
    the feedback, one in the report."""
    filler = " ".join(f"The keepers logged calm weather on day {i} of the season." for i in range(40))
    kb.ingest([{"id": "long", "title": "Calder Foundry", "text": "The Calder foundry stood in Marrowick. " + filler
                + " Marrowick, the foundry's town, lies on the river."},
               {"id": "other", "text": "The gale of 1894 wrecked eleven ships."}])
    assert kb.stats()["chunks"] >= 3
    rep = labelled(kb, "Where did the Calder foundry stand, in Marrowick?", ["Marrowick"], k=5)
    hits = kb.search("Where did the Calder foundry stand, in Marrowick?", k=5, log=False).hits
    assert sum(h.doc_id == "long" for h in hits) >= 2  # two chunk hits of one document
    qid = rep["query_ids"][0]
    rows = kb.conn.execute("SELECT doc_id FROM gate_decisions WHERE query_id=? AND gate='document' AND passed=1",
                           (qid,)).fetchall()
    assert [r[0] for r in rows] == ["long"] and rep["docs_kept"] == 1
    assert json.loads(kb.conn.execute("SELECT docs FROM feedback WHERE query_id=?", (qid,)).fetchone()[0]) == ["long"]


def test_credit_goes_only_to_the_documents_whose_sentences_a_unit_carries(small):
    small.config["writeback"]["max_evidence"] = 1
    rep = labelled(small, "In which town did the Calder foundry stand", ["Marrowick"], relevant=["heron", "calder"])
    assert rep["docs_kept"] == 2  # both documents pass the document gate
    small.writeback()
    [u] = small.units()
    assert u["text"] == "The Calder foundry stood in the town of Marrowick."
    assert u["source_doc_ids"] == ["calder"]  # heron's sentences are not in the unit: no credit
    assert small.document(u["id"])["meta"]["sentences"] == {"calder": [0]}
    assert {r[0] for r in small.conn.execute("SELECT doc_id FROM chunks WHERE id IN (SELECT value FROM "
                                             "json_each((SELECT source_chunk_ids FROM units)))")} == {"calder"}


def test_carried_sentences_of_a_rewritten_unit():
    from writeback_rag.writeback import carried_sentences

    docs = [{"id": d["id"], "text": d["text"]} for d in DOCS]
    rewrite = "Keepers at Inchmurra logged record winds in the great gale. It wrecked eleven ships in 1894."
    assert carried_sentences(rewrite, docs) == {"gale": [0, 1]}
    assert carried_sentences("Herons are birds.", docs) == {}


# ---- compact units: one per source passage, extended by its questions, retired when it no longer helps --


def test_questions_on_one_passage_extend_one_unit_and_rollback_restores_the_old_version(small):
    q1 = labelled(small, "In which town was the Calder foundry?", ["Marrowick"])["query_ids"][0]
    run1 = small.writeback()["run_id"]
    [v1] = list_units(small)
    q2 = labelled(small, "When did the Calder foundry close?", ["1931"])["query_ids"][0]
    out = small.writeback()
    assert out["written"] == 1 and out["merged"] == 1 and out["units"][0]["supersedes"] == [v1["id"]]
    units = {u["id"]: u for u in list_units(small)}
    v2 = units[out["units"][0]["unit_id"]]
    assert v2["anchor"] == v1["anchor"] == "calder" and v2["source_doc_ids"] == ["calder"]
    assert v2["query_ids"] == [q1, q2] and v2["status"] == "active" and v2["run_id"] == out["run_id"]
    # its match text is both questions; its text carries the sentence each answer is in
    assert "In which town" in v2["title"] and "When did" in v2["title"]
    assert "Marrowick" in v2["text"] and "1931" in v2["text"]
    assert units[v1["id"]]["status"] == "superseded" and units[v1["id"]]["ended_by"] == out["run_id"]
    hits = small.search("Calder foundry Marrowick 1931", k=5, mode="bm25", log=False).hits
    assert [h.doc_id for h in hits if h.kind == "unit"] == [v2["id"]]
    with pytest.raises(InputError, match="current unit of the same source passage"):
        small.restore(v1["id"])
    assert small.rollback(out["run_id"]) == 1
    [back] = list_units(small)
    assert back["id"] == v1["id"] and back["status"] == "active" and back["ended_by"] is None
    assert back["run_id"] == run1 and small.check()["ok"]
    hits = small.search("Calder foundry Marrowick 1931", k=5, mode="bm25", log=False).hits
    assert [h.doc_id for h in hits if h.kind == "unit"] == [v1["id"]]


DECOY = {"id": "decoy", "title": "Local questions", "text": "When did the foundry close? Nobody here remembers."}


def test_a_unit_is_written_only_where_the_sources_do_not_rank_the_evidence_first_and_retired_after(small):
    small.config["writeback"]["earn_slot"] = True
    small.ingest([DECOY])
    # the sources already rank the Calder document first for this one: no unit, and the gate says why
    first = labelled(small, "In which town was the Calder foundry?", ["Marrowick"])["query_ids"][0]
    # here the decoy ranks first and the Calder document (which holds 1931) below it: a unit earns its slot
    top = small.search("When did the foundry close?", k=3, include_units=False, log=False).hits
    assert top[0].doc_id == "decoy" and "calder" in [h.doc_id for h in top]
    second = labelled(small, "When did the foundry close?", ["1931"])["query_ids"][0]
    out = small.writeback()
    assert out["covered"] == 1 and out["written"] == 1
    [u] = list_units(small)
    assert u["anchor"] == "calder" and u["query_ids"] == [second] and "1931" in u["text"]
    reason = small.conn.execute("SELECT reason FROM gate_decisions WHERE gate='slot' AND query_id=?",
                                (first,)).fetchone()[0]
    assert "calder first" in reason
    hits = small.search("When did the foundry close?", k=2, mode="bm25", log=False).hits
    assert u["id"] in [h.doc_id for h in hits]
    # nothing new, the ranking unchanged: the unit still earns its slot
    assert small.writeback()["retired"] == 0 and list_units(small)[0]["status"] == "active"
    # the decoy goes: the Calder document ranks first by itself, so the next night retires the unit
    small.delete(["decoy"])
    night = small.writeback()
    assert night["examples"] == 0 and night["retired"] == 1
    [u] = list_units(small)
    assert u["status"] == "retired" and u["ended_by"] == night["run_id"]
    assert all(h.kind == "source" for h in small.search("When did the foundry close?", k=5, log=False).hits)
    small.rollback(night["run_id"])
    assert list_units(small)[0]["status"] == "active" and small.check()["ok"]


def _three_versions(small, between=lambda night: None):
    """Three nights, each adding a question on the Calder passage: versions v1 <- v2 <- v3."""
    runs = []
    for night, (q, a) in enumerate((("In which town was the Calder foundry?", "Marrowick"),
                                    ("When did the Calder foundry close?", "1931"),
                                    ("What did the Calder foundry cast?", "bells"))):
        labelled(small, q, [a])
        runs.append(small.writeback()["run_id"])
        between(night)
    by_run = {u["run_id"]: u["id"] for u in list_units(small)}
    return runs, [by_run[r] for r in runs]


def test_rolling_back_out_of_order_never_leaves_two_current_units_for_one_passage(small):
    runs, (v1, v2, v3) = _three_versions(small)
    assert {u["id"]: u["status"] for u in list_units(small)} == {v1: "superseded", v2: "superseded", v3: "active"}
    small.rollback(runs[1])  # v2 goes; v1 (ended by that run) stays ended: v3 is current
    assert {u["id"]: u["status"] for u in list_units(small)} == {v1: "superseded", v3: "active"}
    assert small.check()["ok"]


def test_a_version_retired_for_wrong_answers_or_gone_stale_is_not_brought_back_by_rollback(small):
    seen = []  # a search made while v2 was current, answered wrong after v3 replaced it
    runs, (v1, v2, v3) = _three_versions(small, lambda night: night == 1 and seen.append(
        small.search("Calder foundry Marrowick 1931", k=3, mode="bm25")))
    assert any(h.kind == "unit" for h in seen[0].hits)
    small.feedback(seen[0].query_id, correct=False)  # retire_after_wrong = 1: the unit it used, v2, retires
    small.rollback(runs[2])
    assert {u["id"]: u["status"] for u in list_units(small)} == {v1: "superseded", v2: "retired"}
    small.rollback(runs[1])  # v2 was that run's unit: it goes, and v1 is current again
    assert {u["id"]: u["status"] for u in list_units(small)} == {v1: "active"}
    labelled(small, "When did the Calder foundry close?", ["1931"])
    run = small.writeback()["run_id"]  # v1 superseded again
    # the source changes: the current version and the one a rollback could bring back both go stale
    small.ingest([dict(DOCS[1], text=DOCS[1]["text"].replace("It cast bells", "It cast anchors"))])
    assert [u["status"] for u in list_units(small)] == ["stale", "stale"]
    small.rollback(run)
    assert all(u["status"] != "active" for u in list_units(small)) and small.check()["ok"]


def test_a_unit_retired_while_the_night_runs_stays_retired(small, monkeypatch):
    from writeback_rag.writeback import DISTILLERS

    labelled(small, "In which town was the Calder foundry?", ["Marrowick"])
    small.writeback()
    [v1] = list_units(small)
    real = DISTILLERS["extractive"]

    def retiring(kb, asks, docs):  # a user retires v1 after the night planned to supersede it
        if small.document(v1["id"])["status"] == "active":
            small.retire(v1["id"])
        return real(kb, asks, docs)

    monkeypatch.setitem(DISTILLERS, "extractive", retiring)
    labelled(small, "When did the Calder foundry close?", ["1931"])
    night = small.writeback()
    assert night["written"] == 1
    status = {u["id"]: (u["status"], u["ended_by"]) for u in list_units(small)}
    assert status[v1["id"]] == ("retired", None)  # not superseded by the night: a rollback must not revive it
    small.rollback(night["run_id"])
    assert {u["id"]: u["status"] for u in list_units(small)} == {v1["id"]: "retired"}


def test_write_back_embeds_each_question_once_in_one_batch(small):
    """The slot check searches every question with feedback and the fit embeds them all: one batch."""
    small.config["writeback"]["earn_slot"] = True
    small.config["learning"].update(min_examples=1, min_holdout=1, holdout=0.5)  # the fit runs on these few
    questions = ["In which town was the Calder foundry?", "When did the Calder foundry close?",
                 "Where did the Calder foundry stand?", "In what year was Grey Heron Light completed?"]
    small.label([{"id": str(i), "query": q, "answers": [a]} for i, (q, a) in
                 enumerate(zip(questions, ["Marrowick", "1931", "Marrowick", "1861"]))])
    calls = []
    inner = small.embedder
    real = inner.encode
    inner.encode = lambda texts, show_progress=False: calls.append(list(texts)) or real(texts)
    out = small.writeback()
    assert out["covered"] + out["written"] >= 1 and out["tuning"]["status"] != "skipped"
    asked = [c for c in calls if set(c) & set(questions)]
    assert len(asked) == 1 and sorted(asked[0]) == sorted(questions)
    assert small.embedder is inner  # the run's cache is gone with the run
