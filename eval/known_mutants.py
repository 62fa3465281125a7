"""One-line changes that each break a behaviour the project promises; every one must fail the fast suite.
The first seven once left the whole fast suite green (issue: `make test` catches real regressions); the
rest guard what later sessions built (BM25 weights and tombstones, the tuning kept per change-log head, the
units canary and its held-out slice, the unit cap's refill, the credit rule). Each is applied in turn, the
fast suite runs, and the change is undone. Run from the repository root: `.venv/bin/python eval/known_mutants.py [WORD ...]` (only the mutants whose
names hold one of the words)."""

import subprocess
import sys

MUTANTS = [
    ("RRF rank off by one", "writeback_rag/tuning.py",
     "for rank, cid in enumerate(sorted(scores, key=lambda c: (-scores[c], c)), 1):",
     "for rank, cid in enumerate(sorted(scores, key=lambda c: (-scores[c], c)), 2):"),
    ("weighted-fusion weights swapped", "writeback_rag/tuning.py",
     "for scores, w in ((bm, 1 - dense_weight), (dn, dense_weight)):",
     "for scores, w in ((bm, dense_weight), (dn, 1 - dense_weight)):"),
    ("doc filter ignored", "writeback_rag/store/records.py",
     '            clauses.append("d.id GLOB ?")\n            args.append(g)', "            pass"),
    ("kind filter ignored", "writeback_rag/indexes.py",
     "np.isin(self.codes, [self.CODES[k] for k in key])", "np.isin(self.codes, list(self.CODES.values()))"),
    ("label feedback counted against units", "writeback_rag/feedback.py",
     'if not (correct or source == "label"):', "if not correct:"),
    ("BM25 IDF epsilon floor removed", "writeback_rag/index.py",
     "        return self.epsilon * self._mean_idf", "        return float(raw)"),
    ("BM25 weights not refreshed when the average length drifts", "writeback_rag/index.py",
     "or abs(avgdl - key[2]) > self.AVGDL_DRIFT * key[2]:", ":"),
    ("BM25 keeps appended postings' weights after a write to their term", "writeback_rag/index.py",
     "            self._extra_w.pop(tid, None)", "            pass"),
    ("units added after a search are not units to the cap", "writeback_rag/indexes.py",
     '        self._units.update(ids[codes == self.CODES["unit"]].tolist())', "        pass"),
    ("BM25 tombstones not skipped", "writeback_rag/index.py",
     "        if self._n_dead:  # tombstones: skip the postings of removed chunks", "        if False:"),
    ("a tuning adopted or rolled back elsewhere is not seen", "writeback_rag/tuning.py",
     "if head is not None and head == self.head:", "if head is not None and self.head is not None:"),
    ("the units canary never turns units off", "writeback_rag/tuning.py",
     'off = [m for m in UNIT_MODES if metrics[m]["ci95"][1] < 0]', "off = []"),
    ("held-out questions make units", "writeback_rag/writeback.py",
     'if not tuning.is_held_out(plan["query"], self.held):', "if True:"),
    ("searches ignore the canary's verdict", "writeback_rag/search.py",
     'and mode in self._units_off(head):', "and False:"),
    ("units over the cap leave fewer than k hits", "writeback_rag/search.py",
     "            depth *= 2", "            break"),
    ("a unit credited for sources it does not carry", "writeback_rag/writeback.py",
     "            if share >= overlap:", "            if share >= 0:"),
    ("searches ignore the learned rankers", "writeback_rag/search.py",
     "            if ranker is not None:\n                fused = self._rerank(", "            if False:\n                fused = self._rerank("),
    ("the ranker leaves every candidate in its slot", "writeback_rag/ranking.py",
     "for slot, i in zip(slots, order):", "for slot, i in zip(slots, range(len(cands))):"),
    ("hybrid searches ignore the adopted cross-encoder", "writeback_rag/search.py",
     "score = tuning.cross_scorer(self._embedder(), self._records(), query) if ranker.first is not None else None",
     "score = None"),
    ("a cross-encoder kept though the held-out questions rank no better with it", "writeback_rag/tuning.py",
     "        if read <= alone:\n            cross, ranker = None, ranker.first",
     "        if False:\n            cross, ranker = None, ranker.first"),
    ("the cross-encoder reads the fused order's first candidates, not its first ranker's", "writeback_rag/ranking.py",
     "best = sorted(range(len(cands)), key=lambda i: (-s[i], i))[:top]", "best = list(range(len(cands)))[:top]"),
]


def main():
    only = sys.argv[1:]  # words of the names to apply (all when none)
    chosen = [m for m in MUTANTS if not only or any(w.lower() in m[0].lower() for w in only)]
    survived = []
    for name, path, old, new in chosen:
        src = open(path, encoding="utf-8").read()
        assert src.count(old) == 1, f"{name}: the line to change is not in {path} exactly once; update this list"
        open(path, "w", encoding="utf-8").write(src.replace(old, new))
        try:
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider"],
                               capture_output=True, text=True)
        finally:
            open(path, "w", encoding="utf-8").write(src)
        verdict = "killed" if r.returncode else "SURVIVED"
        print(f"{verdict:8} {name}: {r.stdout.strip().splitlines()[-1]}")
        if not r.returncode:
            survived.append(name)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} killed")
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
