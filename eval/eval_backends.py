"""The evaluation protocol on the embedded default and on the milvus backend, side by side: static nDCG@10 per
mode and the write-back gain, from copies of one base KB (the same stored vectors; the Milvus copy is moved
there with `reindex --backend milvus`, no re-embedding).

    .venv/bin/python eval/eval_backends.py [../shared/datasets/scifact] [--milvus-uri URI] [--limit-test N]
                                           [--base-kb DIR] [--out eval/results/backends-scifact.md]

Without --milvus-uri a milvus-lite server (the C++ engine) is started on loopback for the run. The settings
are the defaults with include_query = true (what eval/run_eval.py chose on SciFact's train split)."""

import argparse
import json
import os
import tempfile
import time

from common import DATA, command_line, log, write_result
from writeback_rag import eval as ev


def local_milvus(folder):
    from writeback_rag.milvus import serve_local

    return serve_local(os.path.join(folder, "milvus.db"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset", nargs="?", default=os.path.join(DATA, "scifact"))
    ap.add_argument("--milvus-uri", default=None)
    ap.add_argument("--base-kb", default=None, help="a corpus-only KB of the dataset (built there if missing)")
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="wbrag-backends-")
    base = a.base_kb or os.path.join(work, "base")
    server, uri = (None, a.milvus_uri) if a.milvus_uri else local_milvus(work)
    results = {}
    try:
        for name, extra in (("embedded", {}), ("milvus", {"index": {"backend": "milvus"},
                                                          "milvus": {"uri": uri, "collection": "wbrag_eval"}})):
            log(f"protocol on the {name} backend")
            t0 = time.time()
            results[name] = ev.run_protocol(a.dataset, os.path.join(work, name), base_kb=base,
                                            limit_test=a.limit_test, progress=log,
                                            config={"writeback": {"include_query": True}, **extra})
            results[name]["wall_s"] = round(time.time() - t0, 1)
    finally:
        if server is not None:
            server.stop()
    modes = results["embedded"]["modes"]
    metric = "nDCG@10"
    lines = [f"# Backends on {results['embedded']['name']}: embedded vs milvus", "", f"Command: `{command_line()}`", "",
             f"{results['embedded']['n_test']} test queries, {results['embedded']['n_train']} train queries fed to "
             f"write-back; embedder {results['embedded']['embedder']}; Milvus: milvus-lite 2.5.1 (C++ engine) on "
             "loopback, FLAT (AUTOINDEX) vectors, BM25 function over our tokens.", "",
             f"| mode | static {metric} embedded | static milvus | difference | credit/{metric} gain embedded | "
             "gain milvus |", "|---|---|---|---|---|---|"]
    for m in modes:
        e, v = results["embedded"], results["milvus"]
        d_e, d_v = e["deltas"][m][f"credit/{metric}"], v["deltas"][m][f"credit/{metric}"]
        s_e, s_v = e["before"][m][f"strict/{metric}"], v["before"][m][f"strict/{metric}"]
        lines.append(f"| {m} | {s_e:.4f} | {s_v:.4f} | {s_v - s_e:+.4f} | "
                     f"{100 * d_e['delta']:+.2f} [{100 * d_e['lo']:+.2f}, {100 * d_e['hi']:+.2f}] | "
                     f"{100 * d_v['delta']:+.2f} [{100 * d_v['lo']:+.2f}, {100 * d_v['hi']:+.2f}] |")
    lines += ["", "Gains in points with 95% paired-bootstrap CIs (units credited to their source documents).", "",
              "| | embedded | milvus |", "|---|---|---|"]
    for key in ("written", "merged"):
        lines.append(f"| units {key} | {results['embedded']['writeback'].get(key, 0)} | "
                     f"{results['milvus']['writeback'].get(key, 0)} |")
    for m in modes:
        lines.append(f"| {m} mean query ms (after write-back) | {results['embedded']['latency_ms'][m]['after']:.1f} | "
                     f"{results['milvus']['latency_ms'][m]['after']:.1f} |")
    lines.append(f"| protocol wall time s | {results['embedded']['wall_s']} | {results['milvus']['wall_s']} |")
    md = "\n".join(lines) + "\n"
    write_result(md, a.out)
    if a.out:
        with open(os.path.splitext(a.out)[0] + ".json", "w", encoding="utf-8") as f:
            json.dump({"command": command_line(), "results": results}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
