"""Bad input from the fault study: each gets one line with the right advice and an exit code, or a
sensible result; nothing stored is lost or half-written."""

import errno
import os
import sqlite3
import unicodedata

import pytest
from typer.testing import CliRunner

from conftest import CORPUS, write
from writeback_rag import KnowledgeBase
from writeback_rag.backends import probe_native
from writeback_rag.cli import app
from writeback_rag.errors import LLMError, NotAKnowledgeBase, StorageError, UnknownQuery, storage_error
from writeback_rag.text import chunk_text, sentences
from writeback_rag.writeback import list_units

runner = CliRunner()


def wbrag(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def one_line_error(r, code, *needles):
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("wbrag: error")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def kb_path(tmp_path):
    path = str(tmp_path / "kb")
    assert wbrag("init", "--kb", path, "--embedder", "hash").exit_code == 0
    assert wbrag("ingest", "--kb", path, CORPUS, "--quiet").exit_code == 0
    return path


def test_filter_without_key(kb_path):
    one_line_error(wbrag("query", "--kb", kb_path, "fog", "--filter", "=x"), 2, "expected KEY=VALUE")
    one_line_error(wbrag("query", "--kb", kb_path, "fog", "--filter", "nokey"), 2, "expected KEY=VALUE")


def test_fusion_checked_in_every_mode(kb_path):
    one_line_error(wbrag("query", "--kb", kb_path, "fog", "--fusion", "max", "--mode", "bm25"), 2, "unknown fusion")


def test_init_on_a_file_or_under_a_file(tmp_path):
    f = write(tmp_path / "afile", "x")
    one_line_error(wbrag("init", "--kb", f, "--embedder", "hash"), 2, "is a file")
    one_line_error(wbrag("init", "--kb", os.path.join(f, "kb"), "--embedder", "hash"), 2, "cannot create")
    assert open(f).read() == "x"


def test_init_refuses_bad_chunking_and_unknown_embedder(tmp_path):
    one_line_error(wbrag("init", "--kb", tmp_path / "a", "--embedder", "hash", "--chunk-size", "10",
                         "--chunk-overlap", "50"), 2, "chunking")
    one_line_error(wbrag("init", "--kb", tmp_path / "b", "--embedder", "hash", "--dense-index", "ivf"), 2, "flat, hnsw")
    r = wbrag("init", "--kb", tmp_path / "c", "--embedder", "no-such-model-anywhere")
    one_line_error(r, 1, "cannot load embedding model")
    for name in "abc":
        assert not os.path.exists(tmp_path / name / "kb.sqlite")


def test_delete_document_with_a_huge_id(kb_path):
    kb = KnowledgeBase.open(kb_path)
    huge = "x" * 100_000
    kb.ingest([{"id": huge, "text": "A very long id names this note about fog."}])
    assert kb.delete([huge]) == 1 and kb.document(huge) is None
    kb.close()


def test_ids_with_wildcards_match_only_themselves_when_marking_units_stale(tmp_path):
    kb = KnowledgeBase.create(tmp_path / "kb", embedder="hash", notify=lambda m: None,
                              config={"writeback": {"earn_slot": False}})  # a unit for each question
    kb.ingest([{"id": "a%", "text": "The Fenwick Point Light was designed by Aldous Penhallow in 1841."},
               {"id": "ab", "text": "Corran Head got its fog siren in 1902."}])
    kb.label([{"id": "1", "query": "Who designed the Fenwick Point Light?", "answers": ["Aldous Penhallow"]},
              {"id": "2", "query": "When did Corran Head get its fog siren?", "answers": ["1902"]}])
    kb.writeback()
    kb.delete(["a%"])
    status = {u["source_doc_ids"][0]: u["status"] for u in list_units(kb)}
    assert status == {"a%": "stale", "ab": "active"}
    kb.close()


def _damage(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(4096)
        f.write(b"\xde\xad\xbe\xef" * ((size - 4096) // 4))


def test_damaged_database_gives_one_line(kb_path):
    _damage(os.path.join(kb_path, "kb.sqlite"))
    for cmd in (["stats"], ["query", "fog"], ["log"]):
        line = one_line_error(wbrag(*cmd, "--kb", kb_path), 6, "damaged")
        assert "backup" in line


def test_storage_errors_say_what_happened():
    ro = storage_error(sqlite3.OperationalError("attempt to write a readonly database"), "/kb")
    assert "read-only" in ro.message and "writable" in ro.render("cli")
    assert "backup" not in ro.render("cli")
    full = storage_error(OSError(errno.ENOSPC, "No space left on device"), "/kb")
    assert "disk is full" in full.message and "backup" not in full.render("cli")
    full2 = storage_error(sqlite3.OperationalError("database or disk is full"), "/kb")
    assert "disk is full" in full2.message
    assert isinstance(full, StorageError) and full.exit_code == 6


def test_missing_config_is_recreated_with_the_kbs_embedder(kb_path):
    os.remove(os.path.join(kb_path, "config.toml"))
    notes = []
    kb = KnowledgeBase.open(kb_path, notify=notes.append)
    assert kb.config["embedder"]["name"] == "hash" and kb.search("fog", log=False).hits
    assert notes and "recreated" in notes[0] and "re-embed" not in notes[0]
    assert os.path.exists(os.path.join(kb_path, "config.toml"))
    kb.close()


def test_utf16_and_utf32_text_are_read(tmp_path, kb_path):
    os.makedirs(tmp_path / "docs")
    with open(tmp_path / "docs" / "u16.txt", "wb") as f:
        f.write("Fog horns at Tarrow Ness sound every thirty seconds.\n".encode("utf-16"))
    with open(tmp_path / "docs" / "u32.md", "wb") as f:
        f.write("# Beacon\nThe beacon at Skerrow burns paraffin.\n".encode("utf-32"))
    r = wbrag("ingest", "--kb", kb_path, tmp_path / "docs", "--json")
    assert r.exit_code == 0, r.output
    kb = KnowledgeBase.open(kb_path)
    assert "thirty seconds" in kb.document("u16.txt")["text"]
    assert kb.document("u32.md")["title"] == "Beacon"
    kb.close()


def test_named_unsupported_file_is_an_error_but_not_in_a_folder(tmp_path, kb_path):
    f = write(tmp_path / "d" / "slides.key", "not really")
    write(tmp_path / "d" / "note.txt", "A note about the lamp room.")
    r = wbrag("ingest", "--kb", kb_path, f)
    assert r.exit_code == 2 and "unsupported file type '.key'" in r.output and ".pdf" in r.output
    r = wbrag("ingest", "--kb", kb_path, tmp_path / "d")
    assert r.exit_code == 0 and "skipped" in r.output


@pytest.mark.parametrize("name", ["slides.pptx", "report.docx", "manual.pdf", "notes.txt.gz"])
def test_damaged_binary_file_is_an_error_naming_it(tmp_path, kb_path, name):
    pytest.importorskip("markitdown")
    f = write(tmp_path / name, "not really")
    r = wbrag("ingest", "--kb", kb_path, f)
    assert r.exit_code == 2 and name in r.output and ("damaged" in r.output or "not a valid" in r.output), r.output


def test_unreadable_folder_is_reported_as_such(tmp_path, kb_path, monkeypatch):
    folder = tmp_path / "locked"
    folder.mkdir()
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(folder):
            raise PermissionError(errno.EACCES, "Permission denied", str(folder))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    r = wbrag("ingest", "--kb", kb_path, folder)
    assert r.exit_code == 2 and "cannot read folder (Permission denied)" in r.output
    assert "no supported files" not in r.output


def test_newline_in_an_id_keeps_log_one_line_per_query(tmp_path):
    path = str(tmp_path / "kb")
    wbrag("init", "--kb", path, "--embedder", "hash")
    kb = KnowledgeBase.open(path)
    kb.ingest([{"id": "two\nlines", "title": "Odd\nTitle", "text": "Whistling buoys mark the shoal."}])
    kb.search("whistling buoys", k=1)
    kb.search("buoys\nshoal", k=1)
    kb.close()
    r = wbrag("log", "--kb", path)
    assert r.exit_code == 0 and len(r.output.strip().splitlines()) == 2 and "two\\nlines" in r.output
    r = wbrag("query", "--kb", path, "whistling buoys", "-k", "1")
    assert "two\\nlines" in r.output and "Odd\\nTitle" in r.output


def test_nfc_and_nfd_ids_are_one_document(kb_path):
    nfc, nfd = unicodedata.normalize("NFC", "café.md"), unicodedata.normalize("NFD", "café.md")
    assert nfc != nfd
    kb = KnowledgeBase.open(kb_path)
    n0 = kb.stats()["documents"]
    kb.ingest([{"id": nfc, "text": "The keeper's café served tea to visitors."}])
    rep = kb.ingest([{"id": nfd, "text": "The keeper's café served coffee to visitors."}])
    assert rep.updated == 1 and kb.stats()["documents"] == n0 + 1
    res = kb.search("keeper café coffee", k=1, mode="bm25")
    kb.feedback(res.query_id, correct=True, docs=[nfd])
    assert kb.document(nfd)["id"] == nfc
    assert kb.delete([nfd]) == 1 and kb.stats()["documents"] == n0
    kb.close()


def test_library_errors_are_neutral_and_the_cli_renders_commands(tmp_path, kb_path):
    with pytest.raises(NotAKnowledgeBase) as e:
        KnowledgeBase.open(tmp_path / "none")
    assert "wbrag" not in str(e.value) and "KnowledgeBase.create" in str(e.value)
    one_line_error(wbrag("stats", "--kb", tmp_path / "none"), 3, "wbrag init")
    kb = KnowledgeBase.open(kb_path)
    with pytest.raises(UnknownQuery) as e:
        kb.feedback(999, correct=True)
    assert "wbrag" not in str(e.value) and "kb.queries()" in str(e.value)
    with pytest.raises(LLMError) as e:
        kb.answer("who?")
    assert "wbrag" not in str(e.value) and "--" not in str(e.value)
    kb.close()
    one_line_error(wbrag("feedback", "--kb", kb_path, "999", "--correct"), 2, "wbrag log")
    one_line_error(wbrag("answer", "--kb", kb_path, "who?"), 5, "wbrag config")
    r = wbrag("ingest", "--kb", kb_path, "-", input='{"name": "x", "words": "text"}\n')
    assert "text_field" in r.output and "--text-field" not in r.output  # the setting's name, not a CLI flag


def test_closed_kb_refuses_use(kb_path):
    kb = KnowledgeBase.open(kb_path)
    kb.close()
    with pytest.raises(Exception, match="closed"):
        kb.search("fog")


def test_abbreviation_heavy_text_splits_like_before_and_chunks():
    text = "Dr. A. B. Smith met Mr. C. Jones at St. Ives. Then Prof. D. E. Hale left. " * 3
    got = sentences(text)
    assert got[:3] == ["Dr. A. B. Smith met Mr. C. Jones at St. Ives.", "Then Prof. D. E. Hale left.",
                       "Dr. A. B. Smith met Mr. C. Jones at St. Ives."]
    assert sentences("First para ends with Dr.\n\nSecond para.") == ["First para ends with Dr.", "Second para."]
    long = " ".join(["J."] * 3000)  # one endless "sentence" of initials: cut by tokens, every word kept
    chunks = chunk_text(long, 50, 0)
    assert sum(c.count("J.") for c in chunks) == 3000


def test_native_crash_in_probe_becomes_an_llm_error(tmp_path):
    model = write(tmp_path / "m.gguf", "x")
    with pytest.raises(LLMError, match="crashed \\(SIGSEGV\\).*GGML_NATIVE=OFF"):
        probe_native(model, code="import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", cache_dir=str(tmp_path / "c"))
    with pytest.raises(LLMError, match="cannot run"):
        probe_native(model, code="raise SystemExit('bad model file')", cache_dir=str(tmp_path / "c"))
    probe_native(model, code="pass", cache_dir=str(tmp_path / "c"))
    assert len(os.listdir(tmp_path / "c")) == 1  # a pass is remembered
