"""The Python API as apps use it: open-or-create, citations on hits, a stable write-back result, units
retired and restored one at a time, async calls, arguments checked, use after close refused."""

import asyncio
import json

import pytest
from typer.testing import CliRunner

import writeback_rag
from conftest import QUESTIONS
from writeback_rag import KnowledgeBase
from writeback_rag.cli import app
from writeback_rag.errors import InputError

runner = CliRunner()
DOCS = [{"id": "calder", "title": "Calder Foundry", "text": "The Calder foundry stood in the town of Marrowick. "
         "It cast bells and lighthouse lenses.", "source": "notes/calder.md", "lang": "en"},
        {"id": "skerrow", "title": "Skerrow", "text": "The Skerrow light was first lit in 1851.", "source": "notes/s.md"}]


BACKENDS = ["embedded", "milvus"]  # tests that build a KB run on both (conftest.pytest_generate_tests)

def test_public_names_are_exported():
    for name in ("KnowledgeBase", "Hit", "SearchResult", "IngestReport", "WbragError", "InputError"):
        assert hasattr(writeback_rag, name), name


def test_open_or_create(tmp_path):
    path = tmp_path / "kb"
    kb = KnowledgeBase.open_or_create(path, embedder="hash", notify=lambda m: None)
    kb.ingest(DOCS)
    kb.close()
    again = KnowledgeBase.open_or_create(path, embedder="hash", notify=lambda m: None)
    assert again.stats()["documents"] == 2
    again.close()


def test_hits_carry_source_and_metadata_for_citations(kb):
    kb.ingest(DOCS)
    hit = kb.search("Calder foundry bells", k=1, mode="bm25").hits[0]
    assert hit.source == "notes/calder.md" and hit.meta["lang"] == "en"
    assert hit.to_dict()["source"] == "notes/calder.md"


def test_writeback_result_has_the_same_keys_when_there_is_nothing_to_do(kb):
    kb.ingest(DOCS)
    empty = kb.writeback()
    assert empty["written"] == 0 and empty["examples"] == 0 and empty["units"] == []
    kb.label([{"query": "In which town was the Calder foundry?", "answers": ["Marrowick"]}])
    full = kb.writeback()
    assert set(full) == set(empty) and full["written"] + full["covered"] == 1


def test_feedback_docs_may_be_one_id(kb):
    kb.ingest(DOCS)
    res = kb.search("Calder foundry", k=2)
    fid = kb.feedback(res.query_id, correct=True, docs="calder")
    assert kb.query_record(res.query_id)["feedback"][0]["docs"] == ["calder"] and fid


def test_use_after_close_is_refused(kb):
    kb.ingest(DOCS)
    kb.close()
    with pytest.raises(InputError, match="closed"):
        kb.search("Calder")
    with pytest.raises(InputError, match="closed"):
        kb.feedback(1, correct=True)


def test_async_search_and_feedback(kb):
    kb.ingest(DOCS)

    async def go():
        res = await kb.asearch("Skerrow light lit", k=1)
        return res, await kb.afeedback(res.query_id, True, docs=[res.hits[0].doc_id])

    res, fid = asyncio.run(go())
    assert res.hits[0].doc_id == "skerrow" and kb.query_record(res.query_id)["feedback"][0]["id"] == fid


@pytest.fixture
def unit_kb(corpus_kb):
    corpus_kb.label(QUESTIONS, split="train")
    corpus_kb.writeback()
    return corpus_kb


def test_retire_and_restore_one_unit(unit_kb):
    kb = unit_kb
    q = "When was the fog siren at Corran Head installed?"
    unit = next(h for h in kb.search(q, k=5, log=False).hits if h.kind == "unit")
    assert kb.retire(unit.doc_id) == "active"
    assert unit.doc_id not in {h.doc_id for h in kb.search(q, k=10, log=False, max_units=-1).hits}
    assert kb.check()["ok"]
    assert kb.restore(unit.doc_id) == "retired"
    assert unit.doc_id in {h.doc_id for h in kb.search(q, k=5, log=False).hits}
    assert kb.check()["ok"]
    with pytest.raises(InputError, match="no knowledge unit"):
        kb.retire("calder")


def test_units_of_a_later_night_count_against_the_unit_cap_in_a_process_that_searched_before(corpus_kb):
    """The unit cap knows a unit by its chunk: units a second night writes (new chunks) are units for the
    cap and the kind filter in the process that searched after the first night."""
    kb = corpus_kb
    with open(QUESTIONS, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train = [r for r in rows if r["split"] == "train"]
    kb.label(train[: len(train) // 2], split="train")
    first = kb.writeback()
    assert first["written"] > 0
    asked = [r["query"] for r in rows]
    for text in asked:
        kb.search(text, k=10, log=False)
    kb.label(train[len(train) // 2:], split="train")
    assert kb.writeback()["written"] > 0
    for text in asked:
        assert "unit" not in {h.kind for h in kb.search(text, k=10, log=False, max_units=0).hits}, text
        assert len([h for h in kb.search(text, k=10, log=False).hits if h.kind == "unit"]) <= 1, text


def test_cli_wrong_feedback_says_what_it_did_to_units(unit_kb):
    kb = unit_kb
    kb.config["writeback"]["retire_after_wrong"] = 2
    q = "When was the fog siren at Corran Head installed?"
    res = kb.search(q, k=3)
    unit = next(h for h in res.hits if h.kind == "unit").doc_id
    path = kb.path
    kb.close()
    runner.invoke(app, ["config", "--kb", path, "writeback.retire_after_wrong=2"])
    r = runner.invoke(app, ["feedback", str(res.query_id), "--kb", path, "--wrong", "--doc", unit])
    assert r.exit_code == 0 and f"unit {unit}: 1 of 2 wrong answers before it is retired" in r.output
    r = runner.invoke(app, ["feedback", str(res.query_id), "--kb", path, "--wrong", "--doc", unit])
    assert f"unit {unit} retired (2 wrong answers)" in r.output and f"wbrag units restore {unit}" in r.output
    r = runner.invoke(app, ["units", "restore", unit, "--kb", path])
    assert r.exit_code == 0 and "active again (was retired)" in r.output
    r = runner.invoke(app, ["units", "retire", unit, "--kb", path])
    assert r.exit_code == 0 and "retired (was active)" in r.output
