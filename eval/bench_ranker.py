"""What the learned reranker costs a hybrid search: the same questions searched with the KB's adopted tuning
with its reranker (passages' parses cached, and not) and without it (the same tuning otherwise), in blocks
whose order rotates, query vectors cached so the embedder is not timed. Needs a KB whose adopted tuning has a reranker, e.g. the one `eval/run_eval.py`
leaves in its work folder.

    .venv/bin/python eval/bench_ranker.py /tmp/wbrag-eval/squad/main ../shared/datasets/squad --split test
"""
import argparse
import dataclasses
import statistics
import sys
import time

from writeback_rag import KnowledgeBase, ranking
from writeback_rag.eval import _use_cache, load_beir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kb")
    ap.add_argument("dataset")
    ap.add_argument("--split", default="test")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args(argv)
    kb = KnowledgeBase.open(a.kb, notify=lambda m: None)
    texts = [e["query"] for e in load_beir(a.dataset, a.split, corpus=False)["examples"]][:a.queries]
    _use_cache(kb, texts, ("hybrid",))
    active = kb._search.tuning
    tuned = active.get(kb.conn)
    if "hybrid" not in tuned.rankers:
        sys.exit(f"{a.kb}: its adopted tuning has no reranker for hybrid search")
    plain = dataclasses.replace(tuned, rankers={m: r for m, r in tuned.rankers.items() if m != "hybrid"})
    cached = ranking._parse
    times = {"with": [], "cold": [], "without": []}
    for q in texts[:50]:  # warm: pages, indexes, model
        kb.search(q, k=10, mode="hybrid", log=False)
    for r in range(a.rounds):
        names = ("with", "cold", "without")
        for name in names[r % 3:] + names[:r % 3]:
            active.tuning = plain if name == "without" else tuned  # the same tuning id: not reloaded
            # cold: every passage parsed again, as on a corpus whose top candidates the cache cannot hold
            ranking._parse = cached.__wrapped__ if name == "cold" else cached
            t0 = time.perf_counter()
            for q in texts:
                kb.search(q, k=10, mode="hybrid", log=False)
            times[name].append((time.perf_counter() - t0) / len(texts) * 1000)
    ranking._parse = cached
    w, c, wo = (statistics.median(times[n]) for n in ("with", "cold", "without"))
    print(f"hybrid search, k=10, {len(texts)} questions x {a.rounds} rounds, order rotating (median of rounds): "
          f"without the reranker {wo:.2f} ms; with it {w:.2f} ms (+{w - wo:.2f} ms, passages' parses cached), "
          f"{c:.2f} ms (+{c - wo:.2f} ms, every passage parsed)")


if __name__ == "__main__":
    main()
