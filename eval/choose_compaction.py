"""Choose how write-back compacts its units, on train data only.

Units consolidate per source passage (one active unit per document, extended by the questions that draw on
it). writeback.earn_slot decides which questions get one: True writes a unit only for questions whose
evidence the source documents alone do not already rank first (and retires units none of whose questions
still needs them); False writes one for every passage a question drew on. Train queries are split with a
fixed seed: write-back from 80%, measured on the held-out 20% of train (the test split is never used).
Writes eval/results/choose-compaction-<dataset>.md (and .json) with the command on top.

    .venv/bin/python eval/choose_compaction.py            # SQuAD and SciFact, about 15 min on 2 cores
"""

import argparse
import os
import time

from common import DATA, ROOT, command_line, log
from run_eval import fresh, primary
from writeback_rag import eval as ev

VARIANTS = {"earn_slot": [True, False]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datasets", nargs="*", default=[os.path.join(DATA, "squad"), os.path.join(DATA, "scifact")])
    ap.add_argument("--modes", default="hybrid")
    ap.add_argument("--embedder", default="minilm")
    ap.add_argument("--val-frac", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "wbrag-eval"))
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "eval", "results"))
    args = ap.parse_args()
    modes = ev._check_modes(args.modes.split(","))
    for folder in args.datasets:
        lines = [f"# Compact units: settings chosen on train data only", "", "Command:", "", "```sh",
                 command_line(), "```", "", __doc__.split("\n\n")[1].strip(), ""]
        out = {}
        folder = os.path.abspath(folder)
        name = os.path.basename(os.path.normpath(folder))
        work = os.path.join(args.work, name)
        os.makedirs(work, exist_ok=True)
        base = os.path.join(args.work, f"{name}-{args.embedder.replace('/', '_')}-base")
        train = ev.load_beir(folder, "train", corpus=False)["examples"]
        sub, val = ev.validation_split(train, args.val_frac, args.seed)
        metric = primary(any(e["answers"] for e in val))
        keys = [metric] + [m for m in ("answer_recall@1", "answer_recall@5", "credit/nDCG@10", "credit/R@100",
                                      "strict/R@100") if m != metric]
        lines += [f"## {name}", "", f"{len(sub)} train queries written back, {len(val)} held-out train queries "
                  "measured.", "", "| earn_slot | mode | metric | static | after | delta (points) | 95% CI (points) |",
                  "|---|---|---|---:|---:|---:|---|"]
        runs = {}
        for flag in VARIANTS["earn_slot"]:
            t0 = time.time()
            log(f"{name}: earn_slot={flag}")
            r = ev.run_protocol(folder, fresh(os.path.join(work, f"val-earn_slot-{flag}")), modes=modes,
                                embedder=args.embedder, config={"writeback": {"earn_slot": flag}},
                                train_examples=sub, test_examples=val, base_kb=base, seed=args.seed, progress=log)
            r["minutes"] = round((time.time() - t0) / 60, 1)
            runs[flag] = r
            for m in modes:
                for key in keys:
                    c = r["deltas"][m].get(key)
                    if c is not None:
                        lines.append(f"| {flag} | {m} | {ev._label_of(key)} | {c['before']:.3f} | {c['after']:.3f} | "
                                     f"{ev._pts(c['delta'])} | [{ev._pts(c['lo'])}, {ev._pts(c['hi'])}] |")
        n_docs = runs[True]["ingest"]["documents"]
        lines += ["", "| earn_slot | active units | per corpus document | avg tokens | written | covered (no unit needed) | write-back s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for flag, r in runs.items():
            u, w = r["units"], r["writeback"]
            lines.append(f"| {flag} | {u['count']} | {u['count'] / n_docs:.2f} | {u['avg_tokens']:.1f} | "
                         f"{w.get('written', 0)} | {w.get('covered', 0)} | {r['timings']['writeback_s']} |")
        lines.append("")
        out[name] = {str(f): {"deltas": r["deltas"], "units": r["units"], "writeback": r["writeback"],
                              "documents": n_docs} for f, r in runs.items()}
        path = os.path.join(args.out_dir, f"choose-compaction-{name}.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        ev.write_json({"command": command_line(), "results": out}, os.path.splitext(path)[0] + ".json")
        log(f"wrote {path}")


if __name__ == "__main__":
    main()
