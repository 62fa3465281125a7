"""Write-back time of two checkouts on the same labelled KB, alternating (A/B): SciFact's corpus with MiniLM
(the base KB eval/run_eval.py builds under /tmp/wbrag-eval), its train claims labelled once; each round
writes back on a fresh copy, in a fresh process per checkout.

    .venv/bin/python eval/writeback_ab.py OLD_CHECKOUT NEW_CHECKOUT [--rounds 2]
    (e.g. OLD_CHECKOUT from: git worktree add /tmp/old REV)
"""
import argparse
import os
import shutil
import subprocess
import sys

from common import DATA

ONE_RUN = r"""
import shutil, sys, time
sys.path.insert(0, sys.argv[1])
import writeback_rag
assert writeback_rag.__file__.startswith(sys.argv[1]), writeback_rag.__file__
from writeback_rag import KnowledgeBase
shutil.rmtree(sys.argv[3], ignore_errors=True)
shutil.copytree(sys.argv[2], sys.argv[3])
kb = KnowledgeBase.open(sys.argv[3], notify=lambda m: None)
kb.search("load the model and the indexes first", k=1, log=False)
t0 = time.perf_counter()
out = kb.writeback()
print(f"{time.perf_counter() - t0:.1f} s, written {out['written']}, covered {out.get('covered')}, "
      f"tuning {out['tuning']['status']}")
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dataset", default=os.path.join(DATA, "scifact"))
    ap.add_argument("--work", default="/tmp/wbt")
    args = ap.parse_args()
    from writeback_rag import eval as ev

    labelled = os.path.join(args.work, "labelled")
    shutil.rmtree(labelled, ignore_errors=True)
    os.makedirs(args.work, exist_ok=True)
    name = os.path.basename(os.path.normpath(args.dataset))
    kb, _ = ev.copy_kb(os.path.join("/tmp/wbrag-eval", f"{name}-minilm-base"), labelled)
    kb.label(ev.load_beir(args.dataset, "train", corpus=False)["examples"])
    kb.close()
    for r in range(args.rounds):
        for label, root in (("old", args.old), ("new", args.new)):
            out = subprocess.run([sys.executable, "-c", ONE_RUN, os.path.abspath(root), labelled,
                                  os.path.join(args.work, label)], capture_output=True, text=True, check=True)
            print(f"round {r}: {label} ({root}): {out.stdout.strip()}", flush=True)


if __name__ == "__main__":
    main()
