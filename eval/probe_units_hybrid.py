"""Probe (issue 14; run as `.venv/bin/python eval/probe_units_hybrid.py /tmp/wbrag-eval/squad/main`, the KB the SQuAD
evaluation leaves; train questions only): AR@5 on held-out train questions, hybrid, units on in several placements."""
import sys, json, time
import numpy as np
import common  # noqa: F401,E402  (puts the repository root on sys.path)
from writeback_rag import KnowledgeBase, tuning as T
from writeback_rag.text import contains_answer
from writeback_rag.store import tunings as TR

kb = KnowledgeBase.open(sys.argv[1], notify=lambda m: None)
mode = sys.argv[2] if len(sys.argv) > 2 else "hybrid"
K = 5
cfg = kb.config["learning"]
exs = T.examples(kb.conn)
_, held, _ = T.split(cfg, exs)
known = T._answers(kb.conn)
credit = {uid: set(json.loads(d)) for uid, q, d in TR.active_units(kb.conn)}
held = [(t, r) for t, r in held if known.get(T._question(t))]
print("held with answers", len(held))
def ar(hits, ans, k=K):
    return float(any(contains_answer(h.title + " " + h.text, ans) for h in hits[:k]))
rows = []
t0 = time.time()
for text, rel in held:
    ans = known[T._question(text)]
    base = kb.search(text, k=K, mode=mode, include_units=False, log=False).hits
    allh = kb.search(text, k=30, mode=mode, log=False, max_units=-1).hits
    # B: first unit at its rank (cap 1)
    def capped(hs, k=K, dedup=False, last=False):
        out, nu = [], 0
        srcs = [h for h in hs if h.kind != "unit"]
        for h in hs:
            if h.kind == "unit":
                if nu >= 1: continue
                if dedup and credit.get(h.doc_id, set()) <= {s.doc_id for s in srcs[:k]}:
                    continue
                nu += 1
            out.append(h)
            if len(out) == k: break
        if last:
            u = [h for h in out if h.kind == "unit"]
            if u:
                out = srcs[:k - 1] + u
        return out
    B = capped(allh); C = capped(allh, dedup=True); D = capped(allh, last=True); E = capped(allh, dedup=True, last=True)
    uin = any(h.kind == "unit" for h in allh[:K])
    rows.append((ar(base, ans), ar(B, ans), ar(C, ans), ar(D, ans), ar(E, ans), ar(base, ans, 1), ar(B, ans, 1), uin))
rows = np.array(rows)
print("time", round(time.time() - t0), "s")
names = ["base", "cap1", "cap1 dedup", "cap1 last", "dedup last", "base@1", "cap1@1", "unit in top5"]
for n, m in zip(names, rows.mean(0)):
    print(f"{n:14s} {m:.4f}")
for j in range(1, 5):
    d = rows[:, j] - rows[:, 0]
    print(names[j], "delta %+.2f" % (100 * d.mean()), T._paired_ci(rows[:, j], rows[:, 0]))
