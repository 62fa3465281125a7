"""The CLI through Typer's runner, and crash safety of ingest with a real subprocess and SIGKILL."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

from typer.testing import CliRunner

from conftest import CORPUS, QUESTIONS, write
from writeback_rag import KnowledgeBase
from writeback_rag.cli import app

runner = CliRunner()


def run(*args, input=None):
    return runner.invoke(app, list(args), input=input)


def test_cli_main_flow(tmp_path):
    kb = str(tmp_path / "kb")
    r = run("init", "--kb", kb, "--embedder", "hash")
    assert r.exit_code == 0, r.output
    r = run("ingest", "--kb", kb, CORPUS, "--quiet")
    assert r.exit_code == 0 and "added 44" in r.output
    r = run("query", "--kb", kb, "Who designed Fenwick Point Light?", "-k", "3", "--json")
    out = json.loads(r.output)
    assert out["query_id"] == 1 and len(out["hits"]) == 3
    doc = out["hits"][0]["doc_id"]
    r = run("query", "--kb", kb, "Fenwick Point", "--no-log")
    assert "(not logged)" in r.output and "1. " in r.output
    r = run("feedback", "--kb", kb, "1", "--correct", "--doc", doc)
    assert r.exit_code == 0 and "feedback 1 recorded" in r.output
    r = run("log", "--kb", kb, "--json")
    logged = json.loads(r.output)
    assert len(logged) == 1 and logged[0]["feedback"][0]["docs"] == [doc]
    r = run("label", "--kb", kb, QUESTIONS, "--quiet")
    assert r.exit_code == 0 and "labelled 40 examples" in r.output
    r = run("writeback", "--kb", kb, "--dry-run", "--quiet")
    assert r.exit_code == 0 and "run=dry-run" in r.output
    assert KnowledgeBase.open(kb).stats()["units_active"] == 0
    r = run("writeback", "--kb", kb, "--quiet")
    assert r.exit_code == 0 and "written=" in r.output
    r = run("units", "list", "--kb", kb, "--json")
    units = json.loads(r.output)
    assert units and all(u["source_doc_ids"] and u["run_id"] for u in units)
    r = run("units", "show", "--kb", kb, units[0]["id"])
    assert "source_doc_ids" in r.output
    r = run("runs", "--kb", kb)
    assert "done" in r.output
    run_id = units[0]["run_id"]
    r = run("writeback", "rollback", "--kb", kb, run_id)
    assert r.exit_code == 0 and "removed" in r.output
    assert KnowledgeBase.open(kb).stats()["units_active"] == 0
    r = run("stats", "--kb", kb, "--json")
    assert json.loads(r.output)["documents"] == 44


def test_cli_errors_are_one_line_with_exit_codes(tmp_path):
    kb = str(tmp_path / "kb")
    r = run("query", "--kb", str(tmp_path / "nokb"), "x")
    assert r.exit_code == 3 and "not a writeback-rag knowledge base" in r.output
    run("init", "--kb", kb, "--embedder", "hash")
    r = run("feedback", "--kb", kb, "42", "--correct")
    assert r.exit_code == 2 and "unknown query id 42" in r.output
    bad = write(tmp_path / "bad.jsonl", '{"id": "a", "text": "fine"}\n{broken\n')
    r = run("ingest", "--kb", kb, bad, "--quiet")
    assert r.exit_code == 2 and "bad.jsonl: line 2: malformed JSON" in r.output
    good = write(tmp_path / "good.txt", "Good\n\nSome text.")
    r = run("ingest", "--kb", kb, good, bad, "--quiet")
    assert r.exit_code == 1 and "added 1" in r.output
    r = run("label", "--kb", kb, write(tmp_path / "l.jsonl", '{"query": "q", "answers": ["a"]}\nnot json\n'))
    assert r.exit_code == 2 and "l.jsonl:2" in r.output
    r = run("writeback", "rollback", "--kb", kb, "nope")
    assert r.exit_code == 2 and "unknown run" in r.output
    r = run("answer", "--kb", kb, "what?")
    assert r.exit_code == 5 and "no LLM configured" in r.output
    r = run("config", "--kb", kb, "retrieval.rrf_k=30")
    assert r.exit_code == 0 and "retrieval.rrf_k = 30" in r.output


def test_sigkill_during_ingest_leaves_consistent_resumable_kb(tmp_path):
    kb = str(tmp_path / "kb")
    KnowledgeBase.create(kb, embedder="hash").close()
    data = tmp_path / "big.jsonl"
    with open(data, "w") as f:
        for i in range(6000):
            f.write(json.dumps({"id": f"d{i}", "text": f"Document {i} about topic {i % 97} and item {i}. " * 3}) + "\n")
    cmd = [sys.executable, "-m", "writeback_rag.cli", "ingest", "--kb", kb, str(data), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = os.path.join(kb, "kb.sqlite")
    deadline = time.time() + 60
    while time.time() < deadline:
        n = sqlite3.connect(db, timeout=30).execute("SELECT COUNT(*) FROM documents").fetchone()[0]
        if n >= 600:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    k = KnowledgeBase.open(kb, notify=lambda m: None)
    stored = k.stats()["documents"]
    assert 0 < stored < 6000, "the kill must land mid-ingest"
    chunks = k.stats()["chunks"]
    counts = k.check()["counts"]
    assert counts["dense_vectors"] == chunks and counts["bm25_chunks"] == chunks  # indexes agree with the database
    assert k.search("topic 5", mode="dense", log=False).hits
    rep = k.ingest([str(data)])
    assert rep.unchanged == stored and rep.added == 6000 - stored and not rep.skipped
    assert k.stats()["documents"] == 6000
    k.close()


def test_cli_ingest_from_stdin(tmp_path):
    kb = str(tmp_path / "kb")
    run("init", "--kb", kb, "--embedder", "hash")
    lines = "\n".join(json.dumps({"id": f"s{i}", "text": f"stdin record {i}"}) for i in range(3))
    r = run("ingest", "--kb", kb, "-", "--quiet", input=lines)
    assert r.exit_code == 0 and "added 3" in r.output


def test_plain_text_on_stdin_is_one_document(tmp_path):
    kb_path = str(tmp_path / "kb")
    runner = CliRunner()
    runner.invoke(app, ["init", "--kb", kb_path, "--embedder", "hash"])
    r = runner.invoke(app, ["ingest", "--kb", kb_path, "-"], input="Harbour notes\n\nThe pier lamp is lit at dusk.\n")
    assert r.exit_code == 0 and "added 1" in r.output, r.output
    kb = KnowledgeBase.open(kb_path)
    assert kb.document("stdin")["title"] == "Harbour notes" and "pier lamp" in kb.document("stdin")["text"]
    kb.close()
