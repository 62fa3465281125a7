"""Load test of `wbrag serve` on loopback: concurrent search clients, alone and while an ingest and a
write-back run through the same service.

    .venv/bin/python eval/bench_service.py [--clients 8] [--seconds 120] [--embedder minilm]
                                           [--out eval/results/service-load.md]

A KB of the sample corpus (corpora/lighthouses) with its labelled train questions is served by the real CLI
(`wbrag serve`, a subprocess). For the first third of the time the clients only search (the baseline);
for the rest, one more client ingests 20-record batches and a write-back job is started and polled. Every
figure comes from this run; the file written starts with the command."""

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx

from common import ROOT, command_line, write_result

WBRAG = [sys.executable, "-m", "writeback_rag.cli"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--embedder", default="minilm")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    kb = os.path.join(tempfile.mkdtemp(prefix="wbrag-service-"), "kb")
    run = lambda *args: subprocess.run(WBRAG + list(args), check=True, env=env, capture_output=True)  # noqa: E731
    run("init", "--kb", kb, "--embedder", a.embedder)
    run("ingest", "--kb", kb, os.path.join(ROOT, "corpora", "lighthouses"), "--quiet")
    questions = os.path.join(ROOT, "corpora", "lighthouses-questions.jsonl")
    run("label", "--kb", kb, questions, "--quiet")
    queries = [json.loads(line)["query"] for line in open(questions, encoding="utf-8")]
    port = free_port()
    server = subprocess.Popen(WBRAG + ["serve", "--kb", kb, "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    t_start = time.time()
    t_writers = t_start + a.seconds / 3
    t_end = t_start + a.seconds
    lat = {"alone": [], "with writers": []}
    errors, lock = [], threading.Lock()

    def client(seed):
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=60) as c:
            while time.time() < t_end:
                q = rng.choice(queries)
                started = time.time()
                t0 = time.perf_counter()
                try:
                    r = c.post("/search", json={"query": q, "k": 5, "mode": "hybrid"})
                    ok = r.status_code == 200 and r.json()["hits"]
                except httpx.HTTPError as e:
                    ok, r = False, e
                dt = time.perf_counter() - t0
                with lock:
                    if not ok:
                        errors.append(str(getattr(r, "status_code", r)))
                    lat["alone" if started < t_writers else "with writers"].append(dt)

    writes = {"batches": 0, "records": 0, "ingest_s": [], "writeback": None, "errors": []}

    def writer():
        while time.time() < t_writers:
            time.sleep(0.05)
        with httpx.Client(base_url=url, timeout=600) as c:
            job = c.post("/writeback", json={}).json()
            n = 0
            while time.time() < t_end:
                recs = [{"id": f"load-{n + i}", "text": f"Load note {n + i}: the harbour lamp at berth {i} was "
                                                         f"trimmed at dusk and the keeper logged the gale."}
                        for i in range(20)]
                t0 = time.perf_counter()
                r = c.post("/ingest", json={"records": recs})
                writes["ingest_s"].append(time.perf_counter() - t0)
                if r.status_code != 200:
                    writes["errors"].append(r.status_code)
                writes["batches"] += 1
                writes["records"] += 20
                n += 20
                if writes["writeback"] is None:
                    st = c.get(f"/writeback/{job['job_id']}").json()
                    if st["status"] != "running":
                        writes["writeback"] = st
            while writes["writeback"] is None:
                st = c.get(f"/writeback/{job['job_id']}").json()
                if st["status"] != "running":
                    writes["writeback"] = st
                time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check = httpx.get(url + "/check", timeout=120).json()
    server.terminate()
    server.wait(timeout=30)

    ms = lambda x: f"{1000 * x:.1f} ms"  # noqa: E731
    wb = writes["writeback"] or {}
    rows = [(phase, len(xs), ms(statistics.median(xs)) if xs else "-", ms(pct(xs, 95)) if xs else "-",
             ms(pct(xs, 99)) if xs else "-") for phase, xs in lat.items()]
    out = ["# `wbrag serve` under load", "", f"Command: `{command_line()}`", "",
           f"{a.clients} search clients (hybrid, k=5, the sample corpus's questions) against `wbrag serve` on "
           f"loopback for {a.seconds:g} s; embedder {a.embedder}; 2 shared cores. For the first third the clients "
           "search alone; then one more client ingests 20-record batches through POST /ingest while a write-back "
           "job (POST /writeback) runs.", "",
           "| phase | searches | p50 | p95 | p99 |", "|---|---|---|---|---|"]
    out += [f"| {p} | {n} | {a_} | {b_} | {c_} |" for p, n, a_, b_, c_ in rows]
    out += ["", f"- search errors: {len(errors)}" + (f" ({', '.join(sorted(set(errors))[:5])})" if errors else ""),
            f"- ingest: {writes['batches']} batches, {writes['records']} records, p50 "
            f"{ms(statistics.median(writes['ingest_s'])) if writes['ingest_s'] else '-'} a batch, errors "
            f"{len(writes['errors'])}",
            f"- write-back job: {wb.get('status')}, written {((wb.get('result') or {}).get('written'))}, "
            f"{(wb.get('finished', 0) - wb.get('started', 0)):.1f} s" if wb else "- write-back job: did not finish",
            f"- `check` after the run: {'clean' if check.get('ok') else check.get('problems')}"]
    write_result("\n".join(out) + "\n", a.out)
    if errors or writes["errors"] or not check.get("ok") or (wb.get("status") != "done"):
        sys.exit(1)


if __name__ == "__main__":
    main()
