"""Probe (issue 14; run as `.venv/bin/python eval/probe_neighbors.py /tmp/wbrag-eval/squad/main`, the KB the SQuAD
evaluation leaves; train questions only): hybrid ranker (a) fitted on all fit rows instead of the fusion slice, (b) with features from past
questions' relevant documents (query-query neighbours). Held-out train slice only."""
import sys, time, pickle, os
import numpy as np
import common  # noqa: F401,E402  (puts the repository root on sys.path)
from writeback_rag import ranking
from writeback_rag import tuning as T

t0 = time.time()
S = common.feedback_slices(sys.argv[1])
kb, cfg, pool, train, held = S.kb, S.cfg, S.pool, S.train, S.held
fit_rows, held_rows, choose, learn = S.fit_rows, S.held_rows, S.choose, S.learn
tun = kb._search.tuning.get(kb.conn)
w, k = tun.bm25_weight, tun.rrf_k
print("pool", round(time.time() - t0), "s; w k", w, k, "use adapter in hybrid", tun.hybrid_adapter, flush=True)
rows = fit_rows + held_rows
dls = pool.dense(T.UNTUNED, rows)
base = {}
for i, dn in zip(rows, dls):
    f, bm, dn2 = pool.lists("hybrid", i, dn, w, k)
    cands, X = pool.features(i, f, bm, dn2, k)
    docs = pool.docs(cands)
    y = np.array([pool.doc_of.get(c) in pool.relevant[i] for c in cands], dtype=np.float64)
    base[i] = (cands, X, y)
print("features", round(time.time() - t0), "s", flush=True)
Q = pool.q / np.linalg.norm(pool.q, axis=1, keepdims=True)
mem = np.array(fit_rows)
S = Q[rows] @ Q[mem].T  # (rows, mem)
def nb_feats(i, cands):
    s = S[rows.index(i) if False else pos_of[i]].copy()
    if i < len(train):
        s[i] = -1  # itself
    top = np.argsort(-s)[:50]
    best, cnt = {}, {}
    for r, j in enumerate(top):
        for d in pool.relevant[mem[j]]:
            best[d] = max(best.get(d, -1.0), float(s[j]))
            if r < 10:
                cnt[d] = cnt.get(d, 0) + 1
    dd = [pool.doc_of.get(c) for c in cands]
    m = np.array([best.get(d, 0.0) for d in dd])
    c10 = np.array([cnt.get(d, 0) for d in dd], dtype=float)
    return np.stack([m, m - m.max(), c10, (m == m.max()).astype(float)], 1)
pos_of = {i: n for n, i in enumerate(rows)}
ext = {i: np.hstack([base[i][1], nb_feats(i, base[i][0])]) for i in rows}
print("nb", round(time.time() - t0), "s", flush=True)
def fitX(rs, extra):
    r = ranking.fit([((ext[i] if extra else base[i][1]), base[i][2]) for i in rs])
    return r
def evaluate(r, extra):
    return common.recall_at(pool, held_rows, base, lambda i, X: r.score(ext[i] if extra else X))
res = {}
for name, rs, extra in [("choose", choose, False), ("all", fit_rows, False), ("choose+nb", choose, True), ("all+nb", fit_rows, True)]:
    r = fitX(rs, extra)
    res[name] = evaluate(r, extra)
    print(name, len(rs), "R@1 %.4f R@5 %.4f" % tuple(res[name].mean(0)), "weights", np.round(r.weights, 2), flush=True)
for name in ("all", "choose+nb", "all+nb"):
    for j, m in ((0, "R@1"), (1, "R@5")):
        print(name, "-", "choose", m, T._paired_ci(res[name][:, j], res["choose"][:, j]))
r = fitX(fit_rows, False)
import collections
ranks = collections.Counter()
for i in held_rows:
    cands, X, y = base[i]
    s = r.score(X)
    order = sorted(range(len(cands)), key=lambda j: (-s[j], j))
    docs = list(dict.fromkeys(pool.doc_of.get(cands[j]) for j in order))
    rk = next((n for n, d in enumerate(docs) if d in pool.relevant[i]), None)
    ranks["none" if rk is None else (rk + 1 if rk < 10 else "11-30")] += 1
print(sorted(ranks.items(), key=str))
