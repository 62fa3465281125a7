"""Does write-back improve retrieval for held-out queries? The protocol on real BEIR-layout benchmarks.

For each dataset folder (default: ../shared/datasets/squad and ../shared/datasets/scifact, resolved from
the repository root):
  1. include_query True vs False chosen on a validation part of train only (a fixed-seed 20% of the
     train queries held out; write-back from the other 80%; primary metric on hybrid retrieval:
     answer-recall@5 when the dataset has answers, else nDCG@10 with unit credit);
  2. the protocol with the chosen setting: static KB vs after write-back of all train queries, measured
     on the test queries (log=False, they never feed write-back), every mode, paired bootstrap CIs;
  3. the learning curve (train queries replayed in --nights nightly batches) for the datasets in --curve.
Writes eval/results/eval-<name>.md and .json (+ learning-curve-<name>.png) with the command line on top.
The corpus is ingested once per dataset into a base KB under --work; every run starts from a copy of it.

    .venv/bin/python eval/run_eval.py                       # everything (about an hour on 2 CPU cores)
    .venv/bin/python eval/run_eval.py ../shared/datasets/scifact --no-curve --limit-test 100
"""

import argparse
import os
import shutil
import sys
import time

from common import DATA, ROOT, command_line, log
from writeback_rag.errors import WbragError
from writeback_rag import config as cfgmod
from writeback_rag import eval as ev


def fresh(path):
    """A KB folder path under the work dir, emptied of a previous run's KB."""
    if os.path.exists(path):
        if not os.path.exists(os.path.join(path, "kb.sqlite")) and os.listdir(path):
            raise SystemExit(f"run_eval: {path} exists and is not a KB; refusing to delete it")
        shutil.rmtree(path)
    return path


def primary(has_answers):
    return "answer_recall@5" if has_answers else "credit/nDCG@10"


def choose_include_query(folder, work, base, args):
    """Write back 80% of train, measure the held-out 20% of train, for include_query True and False."""
    train = ev.subsample(ev.load_beir(folder, args.train_split, corpus=False)["examples"], args.limit_train, args.seed)
    sub, val = ev.validation_split(train, args.val_frac, args.seed)
    has_answers = any(e["answers"] for e in val)
    metric = primary(has_answers)
    runs = {}
    for flag in (True, False):
        log(f"validation: include_query={flag}: write back {len(sub)} train queries, measure {len(val)} held-out train queries")
        runs[flag] = ev.run_protocol(folder, fresh(os.path.join(work, f"val-include_query-{flag}")),
                                     modes=args.val_modes, embedder=args.embedder, distiller=args.distiller, k=args.k,
                                     config=settings(args, flag), train_examples=sub,
                                     test_examples=val, base_kb=base, seed=args.seed, progress=log)
    score = {f: runs[f]["deltas"]["hybrid" if "hybrid" in args.val_modes else args.val_modes[0]][metric]["delta"]
             for f in runs}
    chosen = True if score[True] >= score[False] else False
    lines = [f"Train queries split with a fixed seed into {len(sub)} written back and {len(val)} held out for "
             f"validation (the test split is not used). Selection metric: {ev._label_of(metric)} delta on "
             f"{'hybrid' if 'hybrid' in args.val_modes else args.val_modes[0]} retrieval; ties keep the default (True). "
             "include_query=True titles a unit with the question it answered; False with its first source "
             "document's title.", "",
             "| include_query | mode | metric | static | after | delta (points) | 95% CI (points) | units | avg unit tokens |",
             "|---|---|---|---:|---:|---:|---|---:|---:|"]
    for flag in (True, False):
        r = runs[flag]
        for m in r["modes"]:
            for key in [metric] + [x for x in ("credit/nDCG@10", "strict/nDCG@10", "answer_recall@1") if x != metric]:
                c = r["deltas"][m].get(key)
                if c is None:
                    continue
                lines.append(f"| {flag} | {m} | {ev._label_of(key)} | {c['before']:.3f} | {c['after']:.3f} | "
                             f"{ev._pts(c['delta'])} | [{ev._pts(c['lo'])}, {ev._pts(c['hi'])}] | "
                             f"{r['units']['count']} | {r['units']['avg_tokens']:.1f} |")
    lines += ["", f"**Chosen: include_query = {chosen}** (validation delta {ev._pts(score[True])} points with True, "
                  f"{ev._pts(score[False])} with False)."]
    summary = {str(f): {"before": runs[f]["before"], "after": runs[f]["after"], "deltas": runs[f]["deltas"],
                        "units": runs[f]["units"], "timings": runs[f]["timings"]} for f in runs}
    return chosen, "\n".join(lines), {"n_written_back": len(sub), "n_validation": len(val), "metric": metric,
                                      "chosen": chosen, "runs": summary}


def _target(c, what, goal, label):
    ok = c["delta"] >= goal
    return (f"{what}: {c['before']:.4f} -> {c['after']:.4f}, {ev._pts(c['delta'])} points [{ev._pts(c['lo'])}, "
            f"{ev._pts(c['hi'])}] vs target {label}: **{'met' if ok else 'not met'}**")


def targets(res):
    """Issue 14's targets: source documents alone (include_units=False) after learning, with units, R@100."""
    out = []
    squad = "answer_recall@5" in res["deltas"].get("hybrid", {})
    head = "answer_recall@5" if squad else "credit/nDCG@10"
    name = "answer-recall@5" if squad else "nDCG@10"
    for m in res["modes"]:
        if m in res.get("sources", {}):
            c = res["sources"][m][head]
            if m == "hybrid":
                goal = 0.01 if squad else 0.02
                out.append(_target(c, f"hybrid {name}, source documents only", goal, f"+{goal * 100:.0f} points"))
            else:
                out.append(_target(c, f"{m} {name}, source documents only", -0.003, "not below static by more than 0.3"))
    if "hybrid" in res["deltas"]:
        c = res["deltas"]["hybrid"][head]
        goal = 0.03 if squad else 0.053
        out.append(_target(c, f"hybrid {name}{'' if squad else ' (credit)'} with units", goal,
                           f"+{goal * 100:.1f} points"))
    for m in res["modes"]:
        for v in ("strict", "credit"):
            c = res["deltas"][m][f"{v}/R@100"]
            out.append(_target(c, f"{m} R@100 ({v}) with units", -0.003, "not below static by more than 0.3"))
    return out


def settings(args, include_query):
    """The evaluation KBs' settings: --set values and the include_query choice."""
    out = cfgmod.parse_settings(args.settings)
    out.setdefault("writeback", {})["include_query"] = include_query
    return out


def report_markdown(result):
    """eval-<name>.md from what eval-<name>.json holds (eval/rewrite_reports.py writes it again from there)."""
    name = result["protocol"]["name"]
    md = ev.markdown_report(result["protocol"], command=result["command"], curve=result.get("learning_curve"),
                            curve_png=f"learning-curve-{name}.png" if result.get("learning_curve") else None,
                            validation=result.get("validation_text"), targets=result.get("targets"))
    return md + f"\nWall time for this dataset (validation, protocol, learning curve): {result['minutes']:.1f} minutes.\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datasets", nargs="*", default=[os.path.join(DATA, "squad"), os.path.join(DATA, "scifact")],
                    help="BEIR-layout folders [default: ../shared/datasets/squad and scifact from the repo root]")
    ap.add_argument("--modes", default="bm25,dense,hybrid", help="comma-separated retrieval modes")
    ap.add_argument("--train-split", default="train")
    ap.add_argument("--test-split", default="test")
    ap.add_argument("--limit-train", type=int, default=None, help="fixed-seed subset of train queries (default all)")
    ap.add_argument("--limit-test", type=int, default=None, help="fixed-seed subset of test queries (default all)")
    ap.add_argument("--embedder", default="minilm")
    ap.add_argument("--distiller", default="extractive")
    ap.add_argument("-k", type=int, default=100, help="chunks retrieved per test query")
    ap.add_argument("--nights", type=int, default=5, help="learning-curve batches")
    ap.add_argument("--curve", default="squad", help="comma-separated dataset names that get a learning curve ('' for none)")
    ap.add_argument("--curve-modes", default="bm25,dense,hybrid")
    ap.add_argument("--no-curve", action="store_true")
    ap.add_argument("--no-validation", action="store_true", help="skip the include_query choice (keep the default True)")
    ap.add_argument("--include-query", choices=("true", "false"), default=None,
                    help="use this writeback.include_query instead of choosing it on validation")
    ap.add_argument("--val-frac", type=float, default=0.2)
    ap.add_argument("--val-modes", default="bm25,dense,hybrid", help="modes measured on validation (the choice uses hybrid)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="SECTION.NAME=VALUE",
                    help="a setting of the evaluation KBs (repeat), e.g. learning.cross_encoder=2000")
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "wbrag-eval"),
                    help="where the KBs go (outside the repo); base KBs there are reused")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "eval", "results"))
    args = ap.parse_args(argv)
    args.modes = ev._check_modes(args.modes.split(","))
    args.val_modes = ev._check_modes(args.val_modes.split(","))
    curve_modes = ev._check_modes(args.curve_modes.split(","))
    curve_names = set() if args.no_curve else {n.strip() for n in args.curve.split(",") if n.strip()}
    cmd = command_line()
    os.makedirs(args.out_dir, exist_ok=True)
    try:
        for folder in args.datasets:
            folder = os.path.abspath(folder)
            name = os.path.basename(os.path.normpath(folder))
            work = os.path.join(args.work, name)
            os.makedirs(work, exist_ok=True)
            base = os.path.join(args.work, f"{name}-{args.embedder.replace('/', '_')}-base")
            t_dataset = time.time()
            include_query, validation, val_json = True, None, None
            if args.include_query is not None:
                include_query = args.include_query == "true"
                validation = f"Not chosen in this run: --include-query {args.include_query} was given."
            elif not args.no_validation:
                include_query, validation, val_json = choose_include_query(folder, work, base, args)
            log(f"{name}: main protocol, include_query={include_query}")
            res = ev.run_protocol(folder, fresh(os.path.join(work, "main")), modes=args.modes,
                                  train_split=args.train_split, test_split=args.test_split, embedder=args.embedder,
                                  distiller=args.distiller, limit_train=args.limit_train, limit_test=args.limit_test,
                                  k=args.k, config=settings(args, include_query), base_kb=base,
                                  seed=args.seed, progress=log)
            curve, png = None, None
            if name in curve_names:
                log(f"{name}: learning curve, {args.nights} nights")
                curve = ev.learning_curve(folder, fresh(os.path.join(work, "curve")), nights=args.nights,
                                          modes=curve_modes, train_split=args.train_split,
                                          test_split=args.test_split, embedder=args.embedder,
                                          distiller=args.distiller, limit_train=args.limit_train,
                                          limit_test=args.limit_test, k=args.k,
                                          config=settings(args, include_query), base_kb=base,
                                          seed=args.seed, progress=log)
                png = os.path.join(args.out_dir, f"learning-curve-{name}.png")
                ev.plot_learning_curve(curve, png)
            result = {"command": cmd, "protocol": res, "validation": val_json, "validation_text": validation,
                      "learning_curve": curve, "targets": targets(res),
                      "minutes": round((time.time() - t_dataset) / 60, 1)}
            with open(os.path.join(args.out_dir, f"eval-{name}.md"), "w", encoding="utf-8") as f:
                f.write(report_markdown(result))
            ev.write_json(result, os.path.join(args.out_dir, f"eval-{name}.json"))
            log(f"{name}: wrote {os.path.join(args.out_dir, f'eval-{name}.md')}")
            for t in result["targets"]:
                log("  " + t)
    except WbragError as e:
        print(f"run_eval: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
