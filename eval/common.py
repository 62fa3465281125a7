"""What the eval scripts share: the repository root on sys.path, offline models, the datasets folder,
timestamped progress lines, the command line that each result file starts with, and writing that file."""

import os
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "datasets"))
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:7.0f}s] {msg}", file=sys.stderr, flush=True)


def command_line():
    """The command as typed from the repository root (the venv's python shown relative to it)."""
    rel = os.path.relpath(sys.executable, ROOT)
    return " ".join(shlex.quote(a) for a in [sys.executable if rel.startswith("..") else rel] + sys.argv)


def write_result(text, out=None):
    """Print a result (markdown) and, with `out`, write it there too."""
    print(text)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)


def feedback_slices(kb_path):
    """What the probes of learned retrieval share: the KB write-back left at `kb_path`, the candidate pool of
    its feedback, and the slices write-back uses (tuning.split and the fusion slice). A namespace of kb, cfg,
    pool, train, held, fit_rows, held_rows, choose (ranker and fusion) and learn (the adapter's)."""
    from types import SimpleNamespace

    from writeback_rag import KnowledgeBase
    from writeback_rag import tuning as T

    kb = KnowledgeBase.open(kb_path, notify=lambda m: None)
    cfg = kb.config["learning"]
    train, held, _ = T.split(cfg, T.examples(kb.conn))
    pool = T._Pool(kb, train + held, int(cfg["candidates"]))
    fit_rows = list(range(len(train)))
    held_rows = list(range(len(train), len(train) + len(held)))
    choose = [i for i in fit_rows if T.in_holdout("fusion " + train[i][0], T.FUSION_SLICE)]
    chosen = set(choose)
    return SimpleNamespace(kb=kb, cfg=cfg, pool=pool, train=train, held=held, fit_rows=fit_rows,
                           held_rows=held_rows, choose=choose, learn=[i for i in fit_rows if i not in chosen])


def recall_at(pool, rows, lists, score, ks=(1, 5)):
    """(len(rows), len(ks)) array: whether a relevant document is in the top k of question i's candidates
    ordered by `score(i, X)`; `lists`: {i: (candidates, features, relevant or not)}."""
    import numpy as np

    out = []
    for i in rows:
        cands, X, _ = lists[i]
        s = score(i, X)
        order = sorted(range(len(cands)), key=lambda j: (-s[j], j))
        docs = list(dict.fromkeys(pool.doc_of.get(cands[j]) for j in order))
        out.append([float(any(d in pool.relevant[i] for d in docs[:k])) for k in ks])
    return np.array(out)
