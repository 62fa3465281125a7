"""`python -m writeback_rag.demo --kb KB QUESTIONS`: label, write back, and measure the held-out gain."""

import argparse
import sys

from .errors import WbragError
from .feedback import read_labels
from .kb import KnowledgeBase
from .text import contains_answer


def answer_rank(kb, ex, k=10, mode="hybrid", include_units=True):
    """Rank of the first hit holding a gold answer (None if not in the top k); test queries are not logged."""
    for h in kb.search(ex["query"], k=k, mode=mode, log=False, include_units=include_units).hits:
        if contains_answer(h.title + " " + h.text, ex["answers"]):
            return h.rank
    return None


def measure(kb, examples, k=10, mode="hybrid", include_units=True):
    ranks = [answer_rank(kb, ex, k, mode, include_units) for ex in examples]
    n = len(ranks)
    return ranks, {
        "answer_recall@1": sum(r == 1 for r in ranks if r) / n,
        "answer_recall@5": sum(1 for r in ranks if r and r <= 5) / n,
        "mrr@10": sum(1 / r for r in ranks if r) / n,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("questions")
    ap.add_argument("--kb", required=True)
    ap.add_argument("--mode", default="hybrid")
    args = ap.parse_args(argv)
    try:
        kb = KnowledgeBase.open(args.kb)
        test = read_labels(args.questions, split="test")
        before_ranks, before = measure(kb, test, mode=args.mode)
        src_before_ranks, src_before = measure(kb, test, mode=args.mode, include_units=False)
        rep = kb.label(args.questions, split="train")
        print(f"labelled {rep['examples']} train questions ({rep['judge']} judge): {rep['useful']} passed the "
              f"utility gate, {rep['docs_kept']} documents kept")
        wb = kb.writeback()
        print(f"write-back run {wb['run_id']}: {wb['covered']} questions already answered first by the documents "
              f"(no unit needed), {wb['written']} units written (one per source passage), {wb['merged']} questions "
              f"joined another's unit, {wb['rejected']} rejected")
        t = wb["tuning"]
        print(f"learned retrieval: {t['status']}" + (
            f" (query adapter + fusion weights fitted on {t['examples']} questions; held-out {t['holdout']}: "
            f"hybrid nDCG@10 {t['metrics']['current']['hybrid']:.3f} -> {t['metrics']['candidate']['hybrid']:.3f})"
            if t.get("metrics") else f": {t['reason']}"))
        after_ranks, after = measure(kb, test, mode=args.mode)
        learned = t["status"] == "adopted"  # else the source documents rank as before: nothing to show
        if learned:
            src_after_ranks, src_after = measure(kb, test, mode=args.mode, include_units=False)
    except WbragError as e:
        print(f"wbrag: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"\nheld-out test questions: {len(test)} ({args.mode} retrieval, measured before and after write-back)")
    print(f"{'metric':<18}{'before':>8}{'after':>8}{'gain':>8}")
    for key in before:
        print(f"{key:<18}{before[key]:>8.3f}{after[key]:>8.3f}{after[key] - before[key]:>+8.3f}")
    if learned:
        print("\nthe same, source documents only (units excluded: what the learned retrieval did alone)")
        print(f"{'metric':<18}{'before':>8}{'after':>8}{'gain':>8}")
        for key in src_before:
            print(f"{key:<18}{src_before[key]:>8.3f}{src_after[key]:>8.3f}{src_after[key] - src_before[key]:>+8.3f}")
    shown = [("with units", before_ranks, after_ranks, True)]
    if learned:
        shown.append(("source documents only", src_before_ranks, src_after_ranks, False))
    for label, br, ar, units in shown:
        moved = [(ex, b, a) for ex, b, a in zip(test, br, ar) if (a or 99) < (b or 99)]
        if moved:
            ex, b, a = max(moved, key=lambda t: (t[1] or 11) - t[2])
            print(f"\nexample, {label}: {ex['query']!r} (answer {ex['answers'][0]!r}), a question no one asked "
                  f"before: rank {b or '>10'} -> {a}")
            hit = kb.search(ex["query"], k=1, log=False, include_units=units).hits[0]
            print(f"  top hit now: {hit.doc_id} [{hit.kind}] {hit.title}\n  {hit.text[:200]}")
    kb.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
