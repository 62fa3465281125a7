"""Choose retrieval.max_units (how many top-k slots knowledge units may take) on train data only.

Train queries are split with a fixed seed: write-back from 80%, measure the held-out 20% of train
(the test split is never used). Writes eval/results/choose-max-units.md with the command on top.

    .venv/bin/python eval/choose_max_units.py --limit-train 3000 --values -1,1,2
"""

import argparse
import os
import shlex
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from writeback_rag import eval as ev  # noqa: E402

DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "datasets"))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("datasets", nargs="*", default=[os.path.join(DATA, "squad"), os.path.join(DATA, "scifact")])
    ap.add_argument("--values", default="-1,1,2")
    ap.add_argument("--limit-train", type=int, default=3000)
    ap.add_argument("--modes", default="bm25,hybrid")
    ap.add_argument("--work", default="/tmp/wbrag-eval")
    ap.add_argument("--out", default=os.path.join(ROOT, "eval", "results", "choose-max-units.md"))
    args = ap.parse_args()
    modes = tuple(args.modes.split(","))
    lines = ["# Choosing retrieval.max_units on train data\n", "Command: `" + " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT)] + sys.argv) + "`\n",
        "Deltas (points) on held-out train queries, write-back from the rest of train; 95% bootstrap CI.\n"]
    for folder in args.datasets:
        name = os.path.basename(folder.rstrip("/"))
        base = os.path.join(args.work, f"{name}-minilm-base")
        train = ev.subsample(ev.load_beir(folder, "train", corpus=False)["examples"], args.limit_train, 0)
        sub, val = ev.validation_split(train, 0.2, 0)
        metric = "answer_recall@5" if any(e["answers"] for e in val) else "credit/nDCG@10"
        lines += [f"\n## {name}: {len(sub)} written back, {len(val)} held out\n",
                  "| max_units | mode | before | after | delta [95% CI] | strict nDCG@10 delta |", "|---|---|---|---|---|---|"]
        for v in [int(x) for x in args.values.split(",")]:
            t0 = time.time()
            path = os.path.join(args.work, f"maxunits-{name}-{v}")
            shutil.rmtree(path, ignore_errors=True)
            res = ev.run_protocol(folder, path, modes=modes, config={"retrieval": {"max_units": v}},
                                  train_examples=sub, test_examples=val, base_kb=base if os.path.exists(base) else None)
            for m in modes:
                d = res["deltas"][m][metric]
                s = res["deltas"][m].get("strict/nDCG@10", {}).get("delta", float("nan"))
                lines.append(f"| {v} | {m} | {res['before'][m][metric]:.3f} | {res['after'][m][metric]:.3f} | "
                             f"{d['delta'] * 100:+.2f} [{d['lo'] * 100:+.2f}, {d['hi'] * 100:+.2f}] | {s * 100:+.2f} |")
            print(f"{name} max_units={v}: {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
            shutil.rmtree(path, ignore_errors=True)
        lines.append(f"\nmetric: {metric}")
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
