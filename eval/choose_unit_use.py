"""Choose how retrieval uses knowledge units, on train data only, and measure the headroom units have.

Query-time settings: retrieval.unit_fusion (joint: units ranked in the same candidate lists as the
documents; separate: units ranked in lists of their own, as if in a second index, then merged) and
retrieval.max_units (top-k slots units may take; -1 no cap). Train queries are split with a fixed
seed: write-back from 80% once, then every setting is measured on the held-out 20% of train (the
test split is never used). Headroom: of the held-out queries whose answer the static KB misses in
its top 5, how many have a unit holding the answer at all, and within the top 100.
Writes eval/results/choose-unit-use.md (and .json) with the command on top.

    .venv/bin/python eval/choose_unit_use.py                  # SQuAD and SciFact, about 20 min on 2 cores
"""

import argparse
import os
import shutil
import time

from common import DATA, ROOT, command_line, log
from writeback_rag import eval as ev
from writeback_rag.text import contains_answer
from writeback_rag.writeback import list_units


def headroom(kb, val, static, k):
    """Held-out queries the static hybrid top 5 misses, and how many of them a unit could rescue."""
    missed = [ex for ex in val if ex.get("answers") and not static["per_query"]["answer_recall@5"][ex["id"]]]
    texts = [f"{u['title']}\n{u['text']}" for u in list_units(kb, include_inactive=False)]
    kb.config["retrieval"].update(max_units=-1, unit_fusion="joint")
    anywhere = in_top = 0
    for ex in missed:
        anywhere += any(contains_answer(t, ex["answers"]) for t in texts)
        hits = kb.search(ex["query"], k=k, mode="hybrid", log=False).hits
        in_top += any(h.kind == "unit" and contains_answer(f"{h.title}\n{h.text}", ex["answers"]) for h in hits)
    return {"n": len(val), "missed": len(missed), "unit_has_answer": anywhere, "unit_has_answer_top_k": in_top, "k": k}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datasets", nargs="*", default=[os.path.join(DATA, "squad"), os.path.join(DATA, "scifact")])
    ap.add_argument("--caps", default="-1,0,1,2", help="max_units values")
    ap.add_argument("--fusions", default="joint,separate", help="unit_fusion values")
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--modes", default="bm25,dense,hybrid")
    ap.add_argument("-k", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "wbrag-eval"))
    ap.add_argument("--out", default=os.path.join(ROOT, "eval", "results", "choose-unit-use.md"))
    args = ap.parse_args()
    modes = ev._check_modes(args.modes.split(","))
    caps = [int(x) for x in args.caps.split(",")]
    fusions = args.fusions.split(",")
    command = command_line()
    lines = ["# Choosing how retrieval uses knowledge units, on train data\n", f"Command: `{command}`\n",
             "Train queries are split with a fixed seed; write-back from 80%, every setting measured on the held-out "
             "20% (the test split is never used). Deltas are after write-back - static KB, in points, paired bootstrap "
             "95% CI. `unit_fusion`: joint = units ranked in the same candidate lists as the documents; separate = "
             "units ranked in lists of their own (a second index) and merged by fused score. `max_units`: top-k slots "
             "units may take (-1: no cap).\n"]
    js = {"command": command, "datasets": {}}
    for folder in args.datasets:
        folder = os.path.abspath(folder)
        name = os.path.basename(os.path.normpath(folder))
        base = os.path.join(args.work, f"{name}-minilm-base")
        path = os.path.join(args.work, f"unit-use-{name}")
        shutil.rmtree(path, ignore_errors=True)
        train = ev.subsample(ev.load_beir(folder, "train", corpus=False)["examples"], args.limit_train, args.seed)
        sub, val = ev.validation_split(train, 0.2, args.seed)
        has_answers = any(e["answers"] for e in val)
        metric = "answer_recall@5" if has_answers else "credit/nDCG@10"
        data = ev.load_beir(folder, "test", corpus=not os.path.exists(os.path.join(base, "kb.sqlite")))
        kb, _ = ev._fresh_kb(path, data, "minilm", None, base, log)
        try:
            ev._use_cache(kb, [e["query"] for e in train], list(modes))
            static = {m: ev.evaluate(kb, val, m, args.k, units={}) for m in modes}
            log(f"{name}: labelling {len(sub)} train queries")
            ev._label(kb, sub, log)
            t0 = time.time()
            wb = kb.writeback()
            log(f"{name}: wrote {wb.get('written', 0)} units in {time.time() - t0:.0f}s; measuring {len(val)} held out")
            units = ev.unit_sources(kb)
            res = {}
            for m in modes:
                for fu in fusions:
                    for cap in caps:
                        kb.config["retrieval"].update(max_units=cap, unit_fusion=fu)
                        res[(m, fu, cap)] = ev.evaluate(kb, val, m, args.k, units=units)
                log(f"  {m}: {len(fusions) * len(caps)} settings measured")
            room = headroom(kb, val, static["hybrid"], args.k) if has_answers and "hybrid" in modes else None
        finally:
            kb.close()
            shutil.rmtree(path, ignore_errors=True)
        keys = [metric] + [x for x in ("answer_recall@1", "credit/nDCG@10", "strict/nDCG@10")
                           if x != metric and x in static[modes[0]]["per_query"]]
        lines += [f"\n## {name}: {len(sub)} train queries written back ({wb.get('written', 0)} units), "
                  f"{len(val)} held out\n",
                  "| mode | unit_fusion | max_units | " + " | ".join(f"{ev._label_of(x)} delta [95% CI]" for x in keys)
                  + " |", "|---|---|---:|" + "---|" * len(keys)]
        rows = {}
        for (m, fu, cap), r in res.items():
            cmp = ev.compare(static[m], r)
            rows[f"{m}|{fu}|{cap}"] = {x: cmp[x] for x in keys}
            lines.append(f"| {m} | {fu} | {cap} | " + " | ".join(
                f"{ev._pts(cmp[x]['delta'])} [{ev._pts(cmp[x]['lo'])}, {ev._pts(cmp[x]['hi'])}]" for x in keys) + " |")
        lines.append("\nStatic KB: " + "; ".join(f"{m} {ev._label_of(metric)} {static[m]['mean'][metric]:.3f}"
                                                 for m in modes) + ".")
        if "hybrid" in modes:
            best = max(((fu, cap) for fu in fusions for cap in caps),
                       key=lambda s: (rows[f"hybrid|{s[0]}|{s[1]}"][metric]["delta"], s == ("joint", 1)))
            lines.append(f"\nBest on hybrid {ev._label_of(metric)} (ties keep the default joint, 1): "
                         f"unit_fusion={best[0]}, max_units={best[1]}.")
        if room:
            ceiling = room["unit_has_answer_top_k"] / room["n"]
            lines.append(
                f"\nHeadroom (hybrid): the static KB misses the answer in its top 5 for {room['missed']} of {room['n']} "
                f"held-out queries. For {room['unit_has_answer']} of them some unit holds the answer; for "
                f"{room['unit_has_answer_top_k']} such a unit is in the top {room['k']} (joint, uncapped). Even if "
                f"every one of those units were moved into the top 5 at no cost to any other query, answer-recall@5 "
                f"would rise by at most {ev._pts(ceiling)} points.")
        js["datasets"][name] = {"metric": metric, "n_written_back": len(sub), "n_validation": len(val),
                                "units": wb.get("written", 0), "static": {m: static[m]["mean"] for m in modes},
                                "deltas": rows, "headroom": room,
                                "best_hybrid": {"unit_fusion": best[0], "max_units": best[1]} if "hybrid" in modes else None}
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        ev.write_json(js, os.path.splitext(args.out)[0] + ".json")
        log(f"{name}: wrote {args.out}")


if __name__ == "__main__":
    main()
