"""Why `kb.ingest` writes 2,048-chunk batches with a 64 MiB SQLite page cache: ingest speed as the KB grows.

Postings are clustered by term, so each commit rewrites pages spread over the whole postings table; with
small batches or a small page cache the same pages are written again and again and ingest slows as the
corpus grows. This ingests one synthetic corpus (bench_core's generator, hash embedder) in five equal
slices under each setting and reports chunks/s per slice. Writes eval/results/ingest-batching.md.

    .venv/bin/python eval/ingest_batching.py            # 60k chunks x 4 settings, about 8 min on 2 cores
"""

import argparse
import json
import os
import shutil
import tempfile
import time

from bench_core import synth_corpus
from common import ROOT, command_line, log
from writeback_rag import KnowledgeBase


def run(docs, batch, cache_mib, work, slices):
    path = os.path.join(work, f"kb-{batch}-{cache_mib}")
    kb = KnowledgeBase.create(path, embedder="hash", notify=lambda *a, **k: None)
    kb.conn.execute(f"PRAGMA cache_size=-{cache_mib * 1024}")
    step = len(docs) // slices
    cps = []
    t_all = time.perf_counter()
    for i in range(slices):
        part = docs[i * step:(i + 1) * step]
        t0 = time.perf_counter()
        rep = kb.ingest(part, batch_chunks=batch)
        cps.append(rep.chunks / (time.perf_counter() - t0))
    total = time.perf_counter() - t_all
    kb.close()
    shutil.rmtree(path)
    return {"batch_chunks": batch, "cache_mib": cache_mib, "cps_per_slice": cps, "total_s": total}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=60_000)
    ap.add_argument("--slices", type=int, default=5)
    ap.add_argument("--settings", default="256:2,256:64,2048:2,2048:64", help="batch_chunks:cache MiB pairs")
    ap.add_argument("--out", default=os.path.join(ROOT, "eval", "results", "ingest-batching.md"))
    args = ap.parse_args()
    command = command_line()
    docs = synth_corpus(args.chunks)  # one chunk per synthetic document
    work = tempfile.mkdtemp(prefix="wbrag-ingest-")
    rows = []
    try:
        for s in args.settings.split(","):
            batch, cache = (int(x) for x in s.split(":"))
            log(f"batch_chunks={batch} cache={cache} MiB")
            rows.append(run(docs, batch, cache, work, args.slices))
            log(f"  chunks/s per slice {[round(c) for c in rows[-1]['cps_per_slice']]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0]["total_s"]
    lines = ["# Ingest speed as the KB grows: write-batch size and SQLite page cache\n", f"Command: `{command}`\n",
             f"One synthetic corpus of {args.chunks:,} one-chunk documents (hash embedder), ingested in "
             f"{args.slices} equal slices into a fresh KB per setting; chunks/s per slice. The library default is "
             "2,048-chunk batches and a 64 MiB cache; SQLite's own default cache is 2 MiB.\n",
             "| batch_chunks | page cache | " + " | ".join(f"slice {i + 1}" for i in range(args.slices))
             + " | last / first | total s | total vs first row |",
             "|---:|---:|" + "---:|" * args.slices + "---:|---:|---:|"]
    for r in rows:
        c = r["cps_per_slice"]
        lines.append(f"| {r['batch_chunks']:,} | {r['cache_mib']} MiB | " + " | ".join(f"{x:,.0f}" for x in c)
                     + f" | {c[-1] / c[0]:.2f} | {r['total_s']:.1f} | {r['total_s'] / base:.2f}x |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"command": command, "rows": rows}, f, indent=1)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
