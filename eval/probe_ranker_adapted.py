"""Probe (issue 14): would the hybrid reranker gain from the cosine under the adapted query vector?

    .venv/bin/python eval/probe_ranker_adapted.py KB

KB: a knowledge base after write-back on a labelled train split (e.g. the one `eval/run_eval.py
../shared/datasets/squad` leaves in /tmp/wbrag-eval/squad/main). Train questions only: the slices are the
ones write-back uses (tuning.split, the fusion slice). The ranker is fitted on the fusion slice with the
features a search computes now, and again with two more: the candidate's cosine to the query vector moved
by an adapter that did not learn from that slice, and that cosine minus the best one. Both rankers are
scored on the held-out slice (with the adapter learned from every fitted question), by the rank of the
first candidate from a relevant document; the failures are counted by rank and a sample printed."""

import collections
import random
import sys
import time

import numpy as np

import common  # noqa: F401,E402  (puts the repository root on sys.path)
from writeback_rag import ranking  # noqa: E402
from writeback_rag import tuning as T  # noqa: E402


def main():
    t0 = time.time()
    S = common.feedback_slices(sys.argv[1])
    kb, cfg, pool, train, held = S.kb, S.cfg, S.pool, S.train, S.held
    fit_rows, held_rows, choose, learn = S.fit_rows, S.held_rows, S.choose, S.learn
    first = T._train_adapter(pool, learn, pool.dense(T.UNTUNED, learn), cfg)
    final = T._train_adapter(pool, fit_rows, pool.dense(T.UNTUNED, fit_rows), cfg)
    tuning = kb._search.tuning.get(kb.conn)
    w, k = tuning.bm25_weight, tuning.rrf_k or int(kb.config["retrieval"]["rrf_k"])

    def examples(rows, adapter, extra):
        out = []
        for i, dn in zip(rows, pool.dense(T.UNTUNED, rows)):
            f, bm, dn = pool.lists("hybrid", i, dn, w, k)
            cands, X = pool.features(i, f, bm, dn, k)
            pool.docs(cands)
            y = np.array([pool.doc_of.get(c) in pool.relevant[i] for c in cands], dtype=np.float64)
            if extra:
                pool.fetch(cands)
                q = pool.q[i] + pool.q[i] @ adapter
                q /= np.linalg.norm(q)
                cos = np.array([float(pool.vec[c] @ q) if c in pool.vec else 0.0 for c in cands])
                X = np.hstack([X, cos[:, None], (cos - cos.max())[:, None]])
            out.append((X, y))
        return out

    def first_relevant(ranker, exs):
        ranks = []
        for X, y in exs:
            s = ranker.score(X)
            order = sorted(range(len(y)), key=lambda j: (-s[j], j))
            ranks.append(next((n for n, j in enumerate(order) if y[j] > 0), None))
        return ranks

    base = ranking.FEATURES
    for extra in (False, True):
        fit_on, judge = examples(choose, first, extra), examples(held_rows, final, extra)
        ranking.FEATURES = base + (("adapted cosine", "adapted cosine - best") if extra else ())
        try:
            ranks = first_relevant(ranking.fit(fit_on), judge)
        finally:
            ranking.FEATURES = base
        r1 = np.mean([r == 0 for r in ranks])
        r5 = np.mean([r is not None and r < 5 for r in ranks])
        print(f"{'with the adapted cosine' if extra else 'features as now'}: held-out R@1 {r1:.4f} R@5 {r5:.4f} "
              f"({len(ranks)} questions, fitted on {len(fit_on)}; {time.time() - t0:.0f} s)", flush=True)
    by = collections.Counter("not in the top 30" if r is None else str(r + 1) if r < 5 else "6-10" if r < 10
                             else "11-30" for r in ranks)
    print("rank of the first relevant candidate:", dict(sorted(by.items())))
    misses = [pool.texts[i] for i, r in zip(held_rows, ranks) if r is None or r >= 5]
    random.seed(1)
    for text in random.sample(misses, min(12, len(misses))):
        print("  missed:", text)


if __name__ == "__main__":
    main()
