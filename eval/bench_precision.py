"""Embedding precision on SciFact: ingest throughput and nDCG@10 of `auto` (bf16 where the CPU has it)
against fp32, in the same run.

    .venv/bin/python eval/bench_precision.py [../shared/datasets/scifact] [--rounds 3] [--block 512] [--batches 16,64]
                                             [--out eval/results/precision.md]

Throughput: the same SciFact chunks embedded in alternating blocks by an fp32 and an `auto` embedder
(`rounds` x `block` chunks each), as the ingest embeds them (title + chunk), at each precision's default batch size and at
`--batches`. Whole ingest and quality: the
corpus is ingested into one KB per precision, in slices that alternate between them, and the test queries
are scored (dense and hybrid nDCG@10, BEIR qrels;
settings were not tuned on the test split). Every figure comes from this run; the file written starts with
the command."""

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from common import DATA, command_line, write_result


def cpu_name():
    """The CPU's model name (/proc/cpuinfo), for the report: the target names a kind of CPU."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset", nargs="?", default=os.path.join(DATA, "scifact"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--slice", type=int, default=500, help="documents per alternating ingest slice")
    ap.add_argument("--batches", default="16,64", help="batch sizes measured beside each precision's default")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from writeback_rag import KnowledgeBase
    from writeback_rag.backends import cpu_has_amx, cpu_has_bf16, get_embedder
    from writeback_rag.config import defaults
    from writeback_rag.eval import evaluate, load_beir
    from writeback_rag.text import chunk_text, index_text

    data = load_beir(a.dataset, "test")
    c = defaults()["chunking"]
    chunks = [index_text(d["title"], ch) for d in data["corpus"] for ch in chunk_text(d["text"], c["size"], c["overlap"])]
    fp32 = get_embedder({"name": "minilm", "precision": "fp32"})
    auto = get_embedder({"name": "minilm", "precision": "auto"})
    chosen = auto.precision
    rng = np.random.default_rng(0)
    sample = [chunks[i] for i in rng.choice(len(chunks), size=min(len(chunks), a.rounds * a.block), replace=False)]
    fp32.encode(sample[:32])
    auto.encode(sample[:32])  # warm both
    # the defaults (each precision's own: see backends.default_batch_size), and others for comparison
    batches = sorted({fp32.batch_size, auto.batch_size, *(int(b) for b in a.batches.split(",") if b)})
    t = {(name, bs): 0.0 for name in ("fp32", "auto") for bs in batches}
    cos = []
    for r in range(a.rounds):
        block = sample[r * a.block:(r + 1) * a.block]
        runs = [(name, bs) for bs in batches for name in ("fp32", "auto")]
        vecs = {}
        for name, bs in (runs if r % 2 == 0 else runs[::-1]):
            emb = fp32 if name == "fp32" else auto
            keep, emb.batch_size = emb.batch_size, bs
            t0 = time.perf_counter()
            vecs[name, bs] = emb.encode(block)
            t[name, bs] += time.perf_counter() - t0
            emb.batch_size = keep
        cos.append((vecs["fp32", fp32.batch_size] * vecs["auto", auto.batch_size]).sum(axis=1))
    cos = np.concatenate(cos)
    n = a.rounds * a.block
    work = tempfile.mkdtemp(prefix="wbrag-precision-")
    quality, kbs = {}, {}
    for precision in ("fp32", "auto"):
        kbs[precision] = KnowledgeBase.create(os.path.join(work, precision), config={"embedder": {"precision": precision}},
                                              notify=lambda m: None)
        quality[precision] = {"model_id": kbs[precision].model_id, "ingest_s": 0.0}
    # the whole ingest path (read, chunk, sort, embed, write), the corpus in slices that alternate between the
    # two KBs (which goes first swaps every slice): a shared machine's drift falls on both alike
    docs = data["corpus"]
    for i, start in enumerate(range(0, len(docs), a.slice)):
        for precision in (("fp32", "auto") if i % 2 == 0 else ("auto", "fp32")):
            t0 = time.perf_counter()
            kbs[precision].ingest(docs[start:start + a.slice])
            quality[precision]["ingest_s"] += time.perf_counter() - t0
    for precision, kb in kbs.items():
        for mode in ("dense", "hybrid"):
            res = evaluate(kb, data["examples"], mode, k=100, units={})
            quality[precision][mode] = res["mean"]["strict/nDCG@10"]
        kb.close()
    shutil.rmtree(work, ignore_errors=True)

    q32, qa = quality["fp32"], quality["auto"]

    def default_of(bs):
        which = [name for name, e in (("fp32", fp32), ("auto", auto)) if e.batch_size == bs]
        return f" ({' and '.join(which)} default)" if which else ""

    out = ["# Embedding precision: fp32 vs auto (MiniLM on SciFact)", "", f"Command: `{command_line()}`", "",
           f"CPU with native bf16: {cpu_has_bf16()}; `auto` chose **{chosen}** (its agreement check on the fixed "
           f"sample gave a lowest cosine of {auto.agreement():.5f}). torch threads: {auto.threads}. CPU: {cpu_name()}, "
           f"{os.cpu_count()} logical cores, AMX: {cpu_has_amx()}.", "",
           "| measure | fp32 | auto | ratio / difference |", "|---|---|---|---|",
           *[f"| embedding throughput at batch size {bs}{default_of(bs)}, {n} "
             f"SciFact chunks in alternating blocks of {a.block} (chunks/s) | {n / t['fp32', bs]:.1f} | "
             f"{n / t['auto', bs]:.1f} | {t['fp32', bs] / t['auto', bs]:.2f}x |" for bs in batches],
           f"| whole-corpus ingest ({len(data['corpus'])} documents in alternating slices of {a.slice}), seconds | "
           f"{q32['ingest_s']:.0f} | "
           f"{qa['ingest_s']:.0f} | {q32['ingest_s'] / qa['ingest_s']:.2f}x |",
           f"| dense nDCG@10 ({len(data['examples'])} test queries) | {q32['dense']:.4f} | {qa['dense']:.4f} | "
           f"{qa['dense'] - q32['dense']:+.4f} |",
           f"| hybrid nDCG@10 | {q32['hybrid']:.4f} | {qa['hybrid']:.4f} | {qa['hybrid'] - q32['hybrid']:+.4f} |",
           f"| cosine of the two vectors of a chunk: min / mean | | | {cos.min():.5f} / {cos.mean():.6f} |",
           f"| stored model id | {q32['model_id']} | {qa['model_id']} | |"]
    write_result("\n".join(out) + "\n", a.out)


if __name__ == "__main__":
    main()
