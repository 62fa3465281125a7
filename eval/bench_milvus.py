"""The milvus backend beside the embedded default, in one run, at a corpus size of your choice.

    .venv/bin/python eval/bench_milvus.py [--chunks 100000] [--rounds 20] [--milvus-uri URI] [--out FILE]

The synthetic corpus of eval/bench_changelog.py (hash embedder, 256-d; Zipf vocabulary; one chunk per
document) is ingested into two KBs, alternating blocks of 10,000 documents between them (ingest throughput:
SQLite, term statistics, the change log, and for milvus the replay into the collection). Then, alternating
the backends every round: steady query latency per mode (top 10, log=False), and a 1-document ingest
followed by the first bm25 and the first hybrid query. Last, each KB is opened in a process of its own that
runs 60 queries per mode: its peak RSS is what the user's process pays (the Milvus server's RSS is shown
when this script started it). Without --milvus-uri a milvus-lite 2.5.1 server (the C++ engine) is started on
loopback in the work folder."""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench_changelog import corpus, queries
from common import ROOT, command_line, log, write_result
from eval_backends import local_milvus

T = time.perf_counter
MODES = ("bm25", "dense", "hybrid")

MEMORY = """
import json, resource, sys
sys.path.insert(0, {root!r})
from writeback_rag import KnowledgeBase
qs = json.loads(sys.stdin.read())
kb = KnowledgeBase.open({path!r}, notify=lambda m: None)
for mode in ("bm25", "dense", "hybrid"):
    for q in qs:
        kb.search(q, k=10, mode=mode, log=False)
print(int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) / 1024)
"""  # VmHWM: ru_maxrss would carry the parent's peak across fork + exec


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return float("nan")
    return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--milvus-uri", default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from writeback_rag import KnowledgeBase

    work = a.workdir or tempfile.mkdtemp(prefix="wbrag-bench-milvus-")
    server, uri = (None, a.milvus_uri) if a.milvus_uri else local_milvus(work)
    try:
        kbs = {}
        for name in ("embedded", "milvus"):
            path = os.path.join(work, name)
            shutil.rmtree(path, ignore_errors=True)
            cfg = {"chunking": {"size": 400, "overlap": 40}}
            if name == "milvus":
                cfg.update(index={"backend": "milvus"}, milvus={"uri": uri, "collection": f"bench_{a.chunks}"})
            kbs[name] = KnowledgeBase.create(path, embedder="hash", config=cfg, notify=lambda m: None)
        texts = corpus(a.chunks)
        ingest_s = {n: 0.0 for n in kbs}
        for s in range(0, len(texts), 10_000):
            block = [{"id": f"d{i}", "text": t} for i, t in enumerate(texts[s:s + 10_000], s)]
            for name, kb in kbs.items():  # the same block into each, one after the other
                t0 = T()
                kb.ingest(block)
                kb.search("w1 w2", k=1, mode="hybrid", log=False)  # caught up (the embedded KB loads here)
                ingest_s[name] += T() - t0
            log(f"ingested {min(s + 10_000, len(texts))} / {len(texts)}: "
                + ", ".join(f"{n} {v:.0f}s" for n, v in ingest_s.items()))
        qs = queries(a.rounds * 16 + 120)  # 8 per backend and round
        steady = {(n, m): [] for n in kbs for m in MODES}
        first = {(n, m): [] for n in kbs for m in ("write", "bm25", "hybrid", "write+bm25")}
        at = 0
        for r in range(a.rounds):
            order = list(kbs) if r % 2 == 0 else list(kbs)[::-1]
            for name in order:
                kb = kbs[name]
                for m in MODES:
                    for _ in range(2):
                        q = qs[at]
                        at += 1
                        t0 = T()
                        kb.search(q, k=10, mode=m, log=False)
                        steady[(name, m)].append(T() - t0)
                t0 = T()
                kb.ingest([{"id": f"new{r}", "text": f"round {r} document w17 w4242 w{r + 100}"}])
                t1 = T()
                kb.search(qs[at], k=10, mode="bm25", log=False)
                t2 = T()
                kb.search(qs[at + 1], k=10, mode="hybrid", log=False)
                t3 = T()
                at += 2
                first[(name, "write")].append(t1 - t0)
                first[(name, "bm25")].append(t2 - t1)
                first[(name, "write+bm25")].append(t2 - t0)
                first[(name, "hybrid")].append(t3 - t2)
        checks = {n: kb.check()["ok"] for n, kb in kbs.items()}
        for kb in kbs.values():
            kb.close()
        memory = {}
        for name in kbs:
            p = subprocess.run([sys.executable, "-c", MEMORY.format(root=ROOT, path=os.path.join(work, name))],
                               input=json.dumps(qs[:60]), capture_output=True, text=True, check=True)
            memory[name] = float(p.stdout.strip().splitlines()[-1])
        server_rss = rss_mib(server._p.pid) if server is not None and server._p is not None else None
    finally:
        if server is not None:
            server.stop()
    ms = lambda x: f"{1000 * x:.2f} ms"  # noqa: E731
    lines = [f"# The milvus backend beside the embedded default, {a.chunks:,} chunks", "",
             f"Command: `{command_line()}`", "",
             f"Synthetic corpus (hash embedder, 256-d; Zipf vocabulary; one chunk per document); Milvus: "
             f"{'milvus-lite 2.5.1 (C++ engine) on loopback, started by this script' if server else uri}; "
             f"{a.rounds} rounds alternating the backends; 2 shared CPU cores. `check` clean afterwards: "
             f"{checks}.", "",
             "| measure | embedded | milvus | milvus / embedded |", "|---|---|---|---|"]
    n = len(texts)
    lines.append(f"| ingest throughput ({n:,} documents, blocks of 10,000) | {n / ingest_s['embedded']:,.0f} docs/s | "
                 f"{n / ingest_s['milvus']:,.0f} docs/s | {ingest_s['milvus'] / ingest_s['embedded']:.2f}x time |")
    for m in MODES:
        for q, label in ((0.5, "p50"), (0.95, "p95")):
            e, v = pct(steady[("embedded", m)], q), pct(steady[("milvus", m)], q)
            lines.append(f"| {m} query {label} | {ms(e)} | {ms(v)} | {v / e:.2f}x |")
    for key, label in (("write", "1-document ingest"), ("bm25", "first bm25 query after it"),
                       ("hybrid", "first hybrid query after it"), ("write+bm25", "write + first bm25 query")):
        e, v = statistics.median(first[("embedded", key)]), statistics.median(first[("milvus", key)])
        lines.append(f"| {label}, p50 | {ms(e)} | {ms(v)} | {v / e:.2f}x |")
    lines.append(f"| peak RSS of the user's process (open + 60 queries per mode) | {memory['embedded']:,.0f} MiB | "
                 f"{memory['milvus']:,.0f} MiB | {memory['milvus'] / memory['embedded']:.2f}x |")
    if server_rss is not None:
        lines.append(f"| Milvus server RSS at the end | | {server_rss:,.0f} MiB | |")
    lines.append(f"| this script's own peak RSS (both KBs open) | {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB | | |")
    write_result("\n".join(lines) + "\n", a.out)


if __name__ == "__main__":
    main()
