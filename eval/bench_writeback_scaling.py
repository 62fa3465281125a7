"""Does write-back cost grow with the feedback, not with the corpus? The same labelled queries are written
back on a small and a 10x larger KB (hash embedder, synthetic text), with a flat (exact) and an HNSW dense
index, and twice the queries on the small one.
Each write-back runs on a fresh copy of its labelled KB, the sizes alternating (A/B) for --rounds rounds;
the medians are compared. Write-back here includes the slot check (a search per question), the units, the
retrieval fit (query adapter + fusion weights + hybrid reranker, which needs 50 questions) and the canary's verdict on the
units (4 searches per held-out question). Its searches (one per question for the slot check, top-100
candidates per question for the fit) cost what a search costs: with a flat index that grows with the
corpus, with HNSW it hardly does.

    .venv/bin/python eval/bench_writeback_scaling.py --out eval/results/writeback-scaling.md   (about 5 minutes)
"""
import argparse
import os
import random
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "eval"))
from bench_changelog import corpus  # noqa: E402
from common import command_line, write_result  # noqa: E402
from writeback_rag import KnowledgeBase  # noqa: E402


def labelled_kb(path, n, queries, index):
    shutil.rmtree(path, ignore_errors=True)
    texts = corpus(n, seed=3)
    kb = KnowledgeBase.create(path, embedder="hash", notify=lambda m: None,
                              config={"chunking": {"size": 400, "overlap": 40}, "dense": {"index": index}})
    kb.ingest([{"id": f"d{i}", "text": t} for i, t in enumerate(texts)])
    rng = random.Random(0)
    ex = []
    for j, i in enumerate(rng.sample(range(n), queries)):
        words = texts[i].split()
        ex.append({"id": str(j), "query": " ".join(words[:6]), "answers": [" ".join(words[6:8])]})
    kb.label(ex, k=5)
    chunks = kb.stats()["chunks"]
    kb.close()
    return chunks


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=5000, help="documents in the small KB")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/tmp/wbb")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    cases = {"small": (args.small, args.queries, "flat"), "large": (10 * args.small, args.queries, "flat"),
             "small, 2x feedback": (args.small, 2 * args.queries, "flat"),
             "small, hnsw": (args.small, args.queries, "hnsw"), "large, hnsw": (10 * args.small, args.queries, "hnsw")}
    info, times, outs = {}, {c: [] for c in cases}, {}
    for c, (n, q, index) in cases.items():
        info[c] = labelled_kb(os.path.join(args.work, c.replace(", ", "-").replace(" ", "")), n, q, index)
    import torch  # noqa: F401  (the fit imports it once per process: not part of any round)
    for rnd in range(args.rounds):
        for c in (cases if rnd % 2 == 0 else reversed(list(cases))):
            src = os.path.join(args.work, c.replace(", ", "-").replace(" ", ""))
            copy = src + "-run"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(src, copy)
            kb = KnowledgeBase.open(copy, notify=lambda m: None)
            t0 = time.perf_counter()
            out = kb.writeback()
            times[c].append(time.perf_counter() - t0)
            outs[c] = out
            kb.close()
            print(f"round {rnd}: {c}: {times[c][-1]:.2f} s", flush=True)
    med = {c: statistics.median(t) for c, t in times.items()}
    lines = ["# Write-back cost: grows with the feedback, not with the corpus", "", "Command:", "", "```sh",
             command_line(), "```", "", __doc__.split("\n\n")[0], "",
             "| case | dense index | chunks | labelled queries | written | covered | tuning | write-back s (median) | runs (s) |",
             "|---|---|---:|---:|---:|---:|---|---:|---|"]
    for c, (n, q, index) in cases.items():
        o = outs[c]
        lines.append(f"| {c} | {index} | {info[c]} | {q} | {o['written']} | {o['covered']} | {o['tuning']['status']} | "
                     f"{med[c]:.2f} | {', '.join(f'{t:.2f}' for t in times[c])} |")
    lines += ["", f"10x the chunks, the same feedback: **{med['large'] / med['small']:.2f}x** with a flat index, "
              f"**{med['large, hnsw'] / med['small, hnsw']:.2f}x** with HNSW. "
              f"Twice the feedback on the small KB: **{med['small, 2x feedback'] / med['small']:.2f}x**."]
    write_result("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
