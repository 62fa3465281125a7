"""Retrieval that learns from feedback, for questions nobody asked before: a linear query adapter on the
embeddings (corpus vectors stay as they are) and the hybrid fusion weights, fitted on the logged feedback
by the nightly write-back and adopted only when a fixed held-out slice of that feedback says the candidate
is not worse than what the KB uses now (the canary). Each fit is a versioned row of `tunings`, shown with
its run and rolled back with it.

The same slice judges the knowledge units, per search mode: a mode whose held-out questions rank worse
with units than without them searches without units until a later night finds them helpful again (the
verdict is part of its run, and rolling the run back restores the one before)."""

import hashlib
import json
import random
import time
from dataclasses import dataclass, field

import numpy as np

from . import crossencoder, ranking, store
from .store.changes import Change
from .store.changes import record as record_change
from .store import documents
from .store import tunings as tuning_records
from .errors import InputError
from .filters import Filter
from .text import bm25_tokens

FUSIONS = ("rrf", "weighted")
BM25_WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
RRF_KS = (5, 10, 20, 60)
FUSION_SLICE = 0.25  # share of the fitted questions that choose the fusion (the rest train the adapter)


@dataclass(frozen=True)
class Tuning:
    """What a search uses from learning: None id is the untuned KB (identity adapter, config's rrf_k)."""
    id: str | None = None
    adapter: np.ndarray | None = None   # (dim, dim): q' = normalize(q + q @ adapter)
    bm25_weight: float = 0.5            # RRF weight of the BM25 list; the dense list gets 1 - bm25_weight
    rrf_k: int | None = None            # None: retrieval.rrf_k
    hybrid_adapter: bool = True         # whether hybrid searches use the adapter too (chosen on the fit set)
    rankers: dict = field(default_factory=dict)  # {search mode: ranking.Ranker}: reorders its top candidates
    cross_encoder: crossencoder.Stored | None = None  # what hybrid's ranker reads, when it has one

    def cross_model(self, embedder):
        """This tuning's cross-encoder made with `embedder`, or None where it has none (or the embedder has
        no transformer for it)."""
        return self.cross_encoder.get(embedder) if self.cross_encoder is not None else None

    def cross_scorer(self, embedder, records, query):
        """score(chunk ids) -> the cross-encoder's scores of those passages for `query`, or None (cross_model)."""
        model = self.cross_model(embedder)
        return None if model is None else crossencoder.scorer(model, records, query)

    def query_vector(self, qv, mode):
        """The vector a search in `mode` uses."""
        return qv if mode == "hybrid" and not self.hybrid_adapter else self.adapt(qv)

    def adapt(self, qv):
        """The query vector(s) moved by the adapter, normalized again (a cosine index expects unit length)."""
        if self.adapter is None:
            return qv
        q = np.asarray(qv, dtype=np.float32)
        out = q + q @ self.adapter
        norm = np.linalg.norm(out, axis=-1, keepdims=True)
        return (out / np.where(norm > 0, norm, 1.0)).astype(np.float32)


UNTUNED = Tuning()


def fuse(bm, dn, mode, fusion="rrf", rrf_k=60, dense_weight=0.5, bm25_weight=0.5):
    """Reciprocal rank fusion (default; each list weighted, 0.5/0.5 is plain RRF) or weighted fusion of
    min-max normalised scores."""
    if mode == "bm25":
        return dict(bm)
    if mode == "dense":
        return dict(dn)
    out = {}
    if fusion == "rrf":
        for scores, w in ((bm, 2 * bm25_weight), (dn, 2 * (1 - bm25_weight))):
            for rank, cid in enumerate(sorted(scores, key=lambda c: (-scores[c], c)), 1):
                out[cid] = out.get(cid, 0.0) + w / (rrf_k + rank)
        return out
    if fusion != "weighted":
        raise InputError(f"unknown fusion {fusion!r}; use one of {', '.join(FUSIONS)}")
    for scores, w in ((bm, 1 - dense_weight), (dn, dense_weight)):
        if not scores:
            continue
        lo, hi = min(scores.values()), max(scores.values())
        for cid, s in scores.items():
            out[cid] = out.get(cid, 0.0) + w * ((s - lo) / (hi - lo) if hi > lo else 1.0)
    return out


# ---- the adopted tuning ---------------------------------------------------------------------


class Active:
    """The KB's adopted tuning. Adopting or rolling one back moves the change log's head (record, rollback),
    so a search that gives the head it caught up to asks the store only when the head has moved."""

    def __init__(self):
        self.tuning, self.key, self.head = UNTUNED, None, None

    def get(self, conn, head=None):
        if head is not None and head == self.head:
            return self.tuning
        key = tuning_records.adopted_id(conn)
        if key != self.key:
            self.tuning, self.key = (load(conn, key) if key else UNTUNED), key
        self.head = head
        return self.tuning


def load(conn, tuning_id):
    r = tuning_records.get(conn, tuning_id)
    if r is None:
        raise InputError(f"unknown tuning {tuning_id!r}")
    adapter = None
    if r["adapter"] is not None:
        adapter = np.frombuffer(r["adapter"], dtype=np.float32).reshape(r["dim"], r["dim"]).copy()
    return Tuning(r["id"], adapter, float(r["bm25_weight"]), int(r["rrf_k"]), bool(r["hybrid_adapter"]),
                  ranking.loads(r["ranker"]), crossencoder.Stored(r["cross_encoder"]) if r["cross_encoder"] else None)


def list_tunings(conn):
    """Every fit, oldest first, with its run, status ('adopted', 'inactive', 'rolled-back'), reason and
    the canary's figures."""
    return [dict(r, metrics=json.loads(r["metrics"]), adapter=bool(r["adapter"]), hybrid_adapter=bool(r["hybrid_adapter"]),
                 ranker=sorted(ranking.loads(r["ranker"])), cross_encoder=bool(r["cross_encoder"]))
            for r in tuning_records.listing(conn)]


def rollback(conn, run_id):
    """Inside a write transaction: a rolled-back run's tuning stops being used; the one adopted before it is
    used again. A change moves the log's head, so every process's searches see it (Active)."""
    n = tuning_records.roll_back(conn, run_id)
    if n:
        record_change(conn, Change())
    return n


# ---- what feedback teaches ------------------------------------------------------------------


def _question(text):
    """A question's identity: its words, case and spacing aside."""
    return " ".join(text.split()).lower()


def examples(conn):
    """(query text, [relevant live source doc ids]) per distinct question with positive evidence: the
    documents a user named as carrying a right answer, or that a labelled set names relevant."""
    rel = {}
    for text, correct, docs, relevant in tuning_records.feedback_evidence(conn):
        key = _question(text)
        named = (json.loads(docs) if correct else []) + json.loads(relevant or "[]")
        if named:
            rel.setdefault(key, (text, {}))[1].update(dict.fromkeys(named))
    live = {}
    out = []
    for text, docs in rel.values():
        keep = []
        for d in docs:
            if d not in live:
                row = documents.get(conn, d)
                live[d] = row is not None and row["kind"] == "source" and row["status"] == "active"
            if live[d]:
                keep.append(d)
        if keep:
            out.append((text, keep))
    return out


def in_holdout(text, frac):
    """A fixed slice: whether a question is held out depends on its text only, so it stays held out."""
    h = int.from_bytes(hashlib.sha1(_question(text).encode()).digest()[:4], "big")
    return h % 10_000 < frac * 10_000


def _ndcg10(ranked_docs, relevant):
    gains = [1.0 / np.log2(i + 2) for i, d in enumerate(ranked_docs[:10]) if d in relevant]
    ideal = sum(1.0 / np.log2(i + 2) for i in range(min(len(relevant), 10)))
    return float(sum(gains) / ideal) if ideal else 0.0


class _Pool:
    """Candidate lists and chunk vectors of the feedback questions (cost grows with feedback, not corpus)."""

    def __init__(self, kb, exs, depth):
        self.conn, self.records, self.depth = kb.conn, kb.records, depth
        self.indexes = kb.corpus.indexes
        self.indexes.catch_up(self.records)
        self.where = Filter.parse(None, include_units=False)  # sources only: what a tuning ranks
        self.texts = [t for t, _ in exs]
        self.relevant = [set(d) for _, d in exs]
        self.embedder = kb.embedder
        self.q = np.asarray(self.embedder.encode(self.texts), dtype=np.float32)
        self.doc_of, self.vec, self.weights, self.cross_scores = {}, {}, {}, {}
        self.n_chunks = sum(self.indexes.kinds.counts.values())
        self.bm = [self._search(t, None, sparse=True)[0] for t in self.texts]
        self.pos = []
        for docs in self.relevant:
            ids = []
            for d in docs:
                ids += documents.chunk_ids(self.conn, d)
            self.pos.append(ids)

    def _search(self, text, qv, sparse=False):
        return self.indexes.scores(self.records, text, qv, self.depth, self.where, sparse=sparse, dense=qv is not None)

    def dense(self, tuning, rows, mode="dense"):
        qs = tuning.query_vector(self.q[rows], mode)
        return [self._search(self.texts[i], q)[1] for i, q in zip(rows, qs)]

    def fetch(self, ids):
        """Stored vectors of these chunks, for training (a chunk deleted meanwhile stays absent)."""
        for cid, blob in self.records.chunks(["vector"], [c for c in dict.fromkeys(ids) if c not in self.vec]):
            self.vec[cid] = np.frombuffer(blob, dtype=np.float32)

    def vectors(self, ids):
        self.fetch(ids)
        return np.stack([self.vec[c] for c in ids if c in self.vec])

    def docs(self, ranked):
        """Document ids in the order of their best chunk (ranked lists are scored often: ids only, cached)."""
        self.doc_of.update(self.records.chunks(["doc"], [c for c in dict.fromkeys(ranked) if c not in self.doc_of]))
        return list(dict.fromkeys(self.doc_of[c] for c in ranked if c in self.doc_of))

    def dense_score(self, rows, dense_lists):
        """Mean nDCG@10 over `rows` of dense retrieval alone."""
        return float(np.mean([_ndcg10(self.docs(sorted(dn, key=lambda c: (-dn[c], c))), self.relevant[i])
                              for i, dn in zip(rows, dense_lists)]))

    def lists(self, mode, i, dn, bm25_weight, rrf_k):
        """(fused, bm25, dense) lists of question i as a search in `mode` makes them (`dn`: its dense list)."""
        bm = self.bm[i] if mode != "dense" else {}
        dn = dn if mode != "bm25" else {}
        return fuse(bm, dn, mode, "rrf", rrf_k, bm25_weight=bm25_weight), bm, dn

    def ranked(self, mode, i, dn, bm25_weight, rrf_k, rankers=(None,), cross=None):
        """Question i's documents in the order a search in `mode` gives, once per ranker (None: no ranker);
        the ranking features are computed once for all of them. `cross`: the cross-encoder a ranker that
        reads one gets."""
        f, bm, dn = self.lists(mode, i, dn, bm25_weight, rrf_k)
        out, X = [], None
        for ranker in rankers:
            g = f
            if ranker is not None:
                if X is None:
                    cands, X = self.features(i, f, bm, dn, rrf_k)
                use, Xr = self.rerank_inputs(ranker, i, cands, X, cross)
                g = ranking.reorder(use, f, cands, Xr)
            out.append(self.docs(sorted(g, key=lambda c: (-g[c], c))))
        return out

    def rerank_inputs(self, ranker, i, cands, X, cross):
        """(ranker, features) as a search uses them (ranking.rerank_inputs), `cross` (a cross-encoder or
        None) reading question i's passages."""
        score = self.cross_score(cross, i) if cross is not None and ranker.first is not None else None
        return ranking.rerank_inputs(ranker, cands, X, score, crossencoder.TOP)

    def cross_score(self, cross, i):
        """score(chunk ids) -> the cross-encoder's scores of their passages for question i, kept per model,
        question and chunk (the canary scores a slice more than once)."""
        read = crossencoder.scorer(cross, self.records, self.texts[i])

        def score(ids):
            todo = [c for c in ids if (cross, i, c) not in self.cross_scores]
            if todo:
                self.cross_scores.update(((cross, i, c), v) for c, v in zip(todo, read(todo)))
            return [self.cross_scores[(cross, i, c)] for c in ids]
        return score

    def mode_scores(self, mode, rows, dense_lists, bm25_weight, rrf_k, rankers=(None,), cross=None):
        """Mean nDCG@10 over `rows` of searches in `mode`, one per ranker (dense_lists: one per row, or None
        for bm25)."""
        per = [[_ndcg10(docs, self.relevant[i])
                for docs in self.ranked(mode, i, dn, bm25_weight, rrf_k, rankers, cross)]
               for i, dn in zip(rows, dense_lists or [None] * len(rows))]
        return [float(np.mean(col)) for col in zip(*per)] if per else [float("nan")] * len(rankers)

    def hybrid_score(self, rows, dense_lists, bm25_weight, rrf_k, ranker=None, cross=None):
        """Mean nDCG@10 over `rows` of hybrid RRF with these weights (and this ranker)."""
        return self.mode_scores("hybrid", rows, dense_lists, bm25_weight, rrf_k, (ranker,), cross)[0]

    def features(self, i, fused, bm, dn, rrf_k):
        """(candidates, ranking features) of question i's fused list, as a search computes them (its words'
        idf kept per question; passages' texts read each time: across many questions they would approach
        the corpus)."""
        if i not in self.weights:
            self.weights[i] = ranking.idf(self.records, bm25_tokens(self.texts[i]), self.n_chunks)
        return ranking.inputs(self.records, self.texts[i], fused, bm, dn, rrf_k, self.n_chunks, weights=self.weights[i])

    def ranker_examples(self, mode, rows, dense_lists, bm25_weight, rrf_k, first=None, cross=None):
        """[(features, relevant or not)] per question of searches in `mode`: what its ranker learns from.
        With `cross`, a cross-encoder's scores of the best candidates of the ranker `first` too."""
        out = []
        for i, dn in zip(rows, dense_lists or [None] * len(rows)):
            f, bm, dn = self.lists(mode, i, dn, bm25_weight, rrf_k)
            cands, X = self.features(i, f, bm, dn, rrf_k)
            if cross is not None:
                X = ranking.with_cross_encoder(first, cands, X, self.cross_score(cross, i), crossencoder.TOP)
            self.docs(cands)  # fills doc_of
            out.append((X, np.array([self.doc_of.get(c) in self.relevant[i] for c in cands], dtype=np.float64)))
        return out

    def score(self, tuning, rows, rrf_k):
        """{dense, hybrid} mean nDCG@10 of a tuning over `rows`."""
        dense = self.dense(tuning, rows)
        hybrid = dense if tuning.hybrid_adapter or tuning.adapter is None else self.dense(tuning, rows, "hybrid")
        return {"dense": self.dense_score(rows, dense),
                "hybrid": self.hybrid_score(rows, hybrid, tuning.bm25_weight, rrf_k, tuning.rankers.get("hybrid"),
                                            tuning.cross_model(self.embedder))}


def _train_adapter(pool, rows, static, cfg, seed=0):
    """A residual linear map of the query vectors (starts at the identity): multi-positive softmax over each
    question's own dense candidates plus the batch's, with an L2 pull towards the identity."""
    import torch

    negatives = int(cfg["negatives"])
    cands = []
    for i, dn in zip(rows, static):
        pos = pool.pos[i]
        neg = [c for c in sorted(dn, key=lambda c: (-dn[c], c)) if c not in set(pos)][:negatives]
        cands.append((pos, neg))
    # chunks another process deleted since they were listed are left out
    pool.fetch([c for part in cands for ids in part for c in ids])
    cands = [([c for c in pos if c in pool.vec], [c for c in neg if c in pool.vec]) for pos, neg in cands]
    rows = [r for r, (pos, _) in zip(rows, cands) if pos]
    cands = [c for c in cands if c[0]]
    gen = torch.Generator().manual_seed(seed)
    dim = pool.q.shape[1]
    W = torch.zeros(dim, dim, requires_grad=True)
    opt = torch.optim.Adam([W], lr=float(cfg["lr"]))
    temp, reg, batch = float(cfg["temperature"]), float(cfg["reg"]), 64
    Q = torch.from_numpy(pool.q[rows])
    for _ in range(int(cfg["epochs"])):
        perm = torch.randperm(len(rows), generator=gen).numpy()
        for s in range(0, len(perm), batch):
            b = perm[s:s + batch]
            ids = list(dict.fromkeys(c for j in b for part in cands[j] for c in part))
            col = {c: n for n, c in enumerate(ids)}
            V = torch.from_numpy(pool.vectors(ids))
            posmask = torch.zeros(len(b), len(ids), dtype=torch.bool)
            for r, j in enumerate(b):
                posmask[r, [col[c] for c in cands[j][0]]] = True
            q = Q[b]
            q2 = q + q @ W
            q2 = q2 / q2.norm(dim=1, keepdim=True)
            S = q2 @ V.T / temp
            loss = -(torch.logsumexp(S.masked_fill(~posmask, -1e9), 1) - torch.logsumexp(S, 1)).mean() \
                + reg * (W ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return W.detach().numpy().astype(np.float32)


def _fit_fusion(pool, rows, lists):
    """(use the adapter, bm25 weight, rrf_k) with the best hybrid nDCG@10 on the fit set; `lists`: dense
    candidate lists per choice of adapter ({True: adapted, False: static})."""
    best = None
    for use, dense_lists in lists.items():
        for w in BM25_WEIGHTS:
            for k in RRF_KS:
                s = pool.hybrid_score(rows, dense_lists, w, k)
                if best is None or s > best[0] + 1e-12:
                    best = (s, use, w, k)
    return best[1:]


def _mode_rankers(pool, current, adapter, choose, held, bm25_weight, rrf_k):
    """({mode: ranker} for bm25 and dense search, {mode: {current, candidate}} held-out nDCG@10): each mode's
    ranker is fitted on the fusion's questions and kept only where it ranks the held-out ones better than the
    ranker that mode has now (or none); otherwise the one it has stays. Dense lists use the adapter dense
    search will use."""
    searching = Tuning(None, adapter)
    picked, metrics = {}, {}
    for mode in ("bm25", "dense"):
        fit_lists = pool.dense(searching, choose) if mode == "dense" else None
        new = ranking.fit(pool.ranker_examples(mode, choose, fit_lists, bm25_weight, rrf_k))
        old = current.rankers.get(mode)
        held_lists = pool.dense(searching, held) if mode == "dense" else None
        # one pass over the held-out questions scores both rankers (their features are the same)
        scores = pool.mode_scores(mode, held, held_lists, bm25_weight, rrf_k, (old,) if new is None else (old, new))
        now, cand = scores[0], scores[-1]
        metrics[mode] = {"current": now, "candidate": cand}
        keep = new if new is not None and cand > now else old
        if keep is not None:
            picked[mode] = keep
    return picked, metrics


def _fit_cross_encoder(pool, rows, choose, choose_lists, searching, bm25_weight, rrf_k, first, most, seed=0):
    """(cross-encoder, hybrid ranker that reads it, report): the model is trained on at most `most` of
    `rows` (a fixed sample by question hash, so a night's cost is bounded whatever the feedback), each
    question's relevant passage against NEGATIVES of the others among `first`'s best POOL; the ranker is
    fitted on the fusion's questions (`choose`, which the model never saw) with its scores of `first`'s
    best TOP. `searching`: the tuning whose query vectors make the rows' hybrid lists."""
    t0 = time.time()
    rows = sorted(rows, key=lambda i: hashlib.sha1(_question(pool.texts[i]).encode()).digest())[:most]
    rng = random.Random(seed)
    triples = []
    for i, dn in zip(rows, pool.dense(searching, rows, "hybrid")):
        f, bm, dn = pool.lists("hybrid", i, dn, bm25_weight, rrf_k)
        cands, X = pool.features(i, f, bm, dn, rrf_k)
        s = first.score(X)
        order = [cands[j] for j in sorted(range(len(cands)), key=lambda j: (-s[j], j))]
        pool.docs(order)
        pos = [c for c in order if pool.doc_of.get(c) in pool.relevant[i]]
        neg = [c for c in order[:crossencoder.POOL] if pool.doc_of.get(c) not in pool.relevant[i]]
        if pos and neg:
            triples.append((i, pos[0], rng.sample(neg, min(crossencoder.NEGATIVES, len(neg)))))
    texts = pool.records.passages([c for _, p, ns in triples for c in (p, *ns)])
    model = crossencoder.CrossEncoder(pool.embedder).train(
        [(pool.texts[i], texts.get(p, ("", "")), [texts.get(c, ("", "")) for c in ns]) for i, p, ns in triples],
        seed=seed)
    ranker = ranking.fit(pool.ranker_examples("hybrid", choose, choose_lists, bm25_weight, rrf_k, first, model),
                         first=first)
    return model, ranker, {"questions": len(triples), "seconds": round(time.time() - t0, 1)}


def decide(now, new, has_adapter, hybrid_uses_it, current):
    """The canary's verdict on a candidate from its held-out nDCG@10 ({dense, hybrid}) against the tuning in
    use: "all" when it is not worse on either; "dense" when its adapter helps dense search but its hybrid
    settings do not (adopted for dense only, hybrid kept as it is: possible when hybrid uses no adapter now);
    "hybrid" when its fusion (without the adapter) is better for hybrid but its adapter is not for dense
    (adopted for hybrid only, the adapter in use kept); None: kept inactive. Returns (verdict, reason)."""
    dense_ok, hybrid_ok = new["dense"] >= now["dense"], new["hybrid"] >= now["hybrid"]
    if dense_ok and hybrid_ok:
        return "all", "not worse on the held-out feedback"
    if dense_ok and has_adapter and not (current.adapter is not None and current.hybrid_adapter):
        return "dense", "adopted for dense search; hybrid settings kept as they were (the fitted ones were worse there)"
    if not dense_ok and not hybrid_uses_it and new["hybrid"] > now["hybrid"]:
        return "hybrid", "adopted for hybrid search (fusion weights); the query adapter in use is kept for dense"
    return None, "worse on the held-out feedback than the tuning in use: kept inactive"


def split(cfg, exs):
    """(questions learned from, held-out questions, why learning waits or None): the fixed slice, and
    whether there is enough feedback on both sides of it (`cfg`: the [learning] settings)."""
    frac = float(cfg["holdout"])
    train = [e for e in exs if not in_holdout(e[0], frac)]
    held = [e for e in exs if in_holdout(e[0], frac)]
    need_fit, need_held = int(cfg["min_examples"]), int(cfg["min_holdout"])
    wait = None if len(train) >= need_fit and len(held) >= need_held else (
        f"{len(train)} questions to learn from (need {need_fit}) and {len(held)} held out (need {need_held})")
    return train, held, wait


def fit(kb, run_id, exs=None):
    """Fit a candidate tuning on the feedback outside the held-out slice, measure it against the adopted one
    on the slice, and adopt it only when it is not worse (dense and hybrid nDCG@10). `exs`: examples(),
    when the caller has them. Returns (report, row for `record`), row None when nothing was fitted."""
    cfg = kb.config["learning"]
    conn = kb.conn
    if not cfg["enabled"]:
        return {"status": "off", "reason": "learning.enabled is false"}, None
    train, held, wait = split(cfg, examples(conn) if exs is None else exs)
    if wait:
        return {"status": "skipped", "examples": len(train), "holdout": len(held),
                "reason": f"{wait}: learning waits for more feedback"}, None
    t0 = time.time()
    model = kb.model_id
    current = Active().get(conn)
    pool = _Pool(kb, train + held, int(cfg["candidates"]))
    fit_rows, held_rows = list(range(len(train))), list(range(len(train), len(train) + len(held)))
    # the fusion is chosen on questions an adapter did not learn from: on its own training questions the
    # adapted dense lists look better than they will be, and hybrid would lean on them too much
    choose = [i for i in fit_rows if in_holdout("fusion " + train[i][0], FUSION_SLICE)] or fit_rows
    chosen = set(choose)
    learn = ([i for i in fit_rows if i not in chosen] or fit_rows) if cfg["adapter"] else []
    adapter = _train_adapter(pool, learn, pool.dense(UNTUNED, learn), cfg) if learn else None
    lists = {False: pool.dense(UNTUNED, choose)}
    if adapter is not None:
        lists[True] = pool.dense(Tuning(None, adapter), choose)
    use, w, k = _fit_fusion(pool, choose, lists)
    # hybrid's ranker learns on the same questions, from the lists the chosen fusion makes of them
    ranker = ranking.fit(pool.ranker_examples("hybrid", choose, lists[use], w, k)) if cfg["ranker"] else None
    cross, cross_report = None, None
    if ranker is not None and int(cfg["cross_encoder"]) > 0:
        if crossencoder.transformer_of(pool.embedder) is None:
            cross_report = {"kept": False, "reason": "the embedder has no transformer to make one of"}
        else:  # trained on the adapter's questions: the ranker that weighs it learns on the fusion's
            cross, ranker, cross_report = _fit_cross_encoder(
                pool, [i for i in fit_rows if i not in chosen], choose, lists[use],
                Tuning(None, adapter) if use else UNTUNED, w, k, ranker, int(cfg["cross_encoder"]))
    if adapter is not None:  # the fusion chosen, the adapter learns from every fitted question
        adapter = _train_adapter(pool, fit_rows, pool.dense(UNTUNED, fit_rows), cfg)
    if cross is not None:  # kept only where it ranks the held-out questions better than its first ranker alone
        held_lists = pool.dense(Tuning(None, adapter, w, k, use), held_rows, "hybrid")
        alone, read = pool.mode_scores("hybrid", held_rows, held_lists, w, k, (ranker.first, ranker), cross)
        cross_report.update(kept=read > alone, held_out={"without": alone, "with": read})
        if read <= alone:
            cross, ranker = None, ranker.first
    candidate = Tuning(None, adapter, w, k, use, {"hybrid": ranker} if ranker is not None else {},
                       crossencoder.Stored(model=cross) if cross is not None else None)
    cur_k = current.rrf_k or int(kb.config["retrieval"]["rrf_k"])
    now = pool.score(current, held_rows, cur_k)
    new = pool.score(candidate, held_rows, k)
    verdict, reason = decide(now, new, adapter is not None, use, current)
    adopt = verdict is not None
    cross_stored = candidate.cross_encoder
    if verdict == "dense":  # hybrid searches exactly as they are now (the current weights, no adapter)
        use, w, k, ranker = False, current.bm25_weight, cur_k, current.rankers.get("hybrid")
        cross_stored = current.cross_encoder
        new = {"dense": new["dense"], "hybrid": now["hybrid"]}
    elif verdict == "hybrid":  # dense searches as now: the adapter in use is kept
        adapter = current.adapter
        new = {"dense": now["dense"], "hybrid": new["hybrid"]}
    rankers = {"hybrid": ranker} if ranker is not None else {}
    if adopt and cfg["ranker"]:  # and a ranker each for bm25 and dense search, where it helps the held-out slice
        picked, metrics_r = _mode_rankers(pool, current, adapter, choose, held_rows, w, k)
        rankers.update(picked)
    metrics = {"current": now, "candidate": new, "current_id": current.id, "seconds": round(time.time() - t0, 2)}
    if adopt and cfg["ranker"]:
        metrics["rankers"] = metrics_r
    if cross_report is not None:
        metrics["cross_encoder"] = cross_report
    report = {"status": "adopted" if adopt else "inactive", "id": f"tuning:{run_id}", "examples": len(train),
              "holdout": len(held), "bm25_weight": w, "rrf_k": k, "adapter": adapter is not None,
              "hybrid_adapter": use, "ranker": sorted(rankers), "cross_encoder": cross_stored is not None,
              "metrics": metrics, "reason": reason}
    # only an adopted tuning keeps its cross-encoder's bytes: no search uses an inactive one
    return report, (run_id, model, int(pool.q.shape[1]), adapter, rankers, cross_stored if adopt else None)


def record(conn, report, row):
    """Store a fit, before the night's units are judged with it (a run killed after this has the fit rolled
    back when the night is resumed, and fitted again)."""
    run_id, model, dim, adapter, rankers, cross = row
    tuning_records.insert(conn, report["id"], run_id, time.time(), report["status"], model, dim,
                          report["bm25_weight"], report["rrf_k"], int(report["hybrid_adapter"]),
                          None if adapter is None else adapter.tobytes(), ranking.dumps(rankers),
                          None if cross is None else cross.blob,
                          report["examples"], report["holdout"], json.dumps(report["metrics"]), report["reason"])
    record_change(conn, Change())  # searches read the adopted tuning again (Active)


# ---- the canary for knowledge units ----------------------------------------------------------


UNIT_MODES = ("bm25", "dense", "hybrid")


def _credit_ndcg10(hits, relevant, credit):
    """nDCG@10 of hits over relevant source documents: a unit stands for the documents it carries
    sentences of (`credit`: unit id -> doc ids); each relevant document counts once, where it first shows."""
    found, dcg = set(), 0.0
    for i, h in enumerate(hits[:10]):
        docs = credit.get(h.doc_id, ()) if h.kind == "unit" else (h.doc_id,)
        new = [d for d in docs if d in relevant and d not in found]
        if new:
            found.update(new)
            dcg += 1.0 / np.log2(i + 2)
    ideal = sum(1.0 / np.log2(i + 2) for i in range(min(len(relevant), 10)))
    return dcg / ideal if ideal else 0.0


def held_out(kb, exs=None):
    """The questions (by _question) of the fixed slice that judges what write-back learns, when there is
    enough feedback to judge it (else none): they are never learned from, units included."""
    cfg = kb.config["learning"]
    if not cfg["enabled"]:
        return frozenset()
    _, held, wait = split(cfg, examples(kb.conn) if exs is None else exs)
    return frozenset() if wait else frozenset(_question(t) for t, _ in held)


def is_held_out(text, held):
    return _question(text) in held


def _answer_rr10(hits, answers):
    """Reciprocal rank of the first of the top 10 hits holding an answer (a unit's text counts)."""
    from .text import contains_answer

    return next((1.0 / (i + 1) for i, h in enumerate(hits[:10]) if contains_answer(h.title + " " + h.text, answers)),
                0.0)


def _answers(conn):
    """Known answers per question (a labelled set's gold answers, found or not; answers users confirmed
    right), by _question."""
    out = {}
    for text, gold, answer, source, correct in tuning_records.labelled_answers(conn):
        got = json.loads(gold or "[]") + ([answer] if answer and correct and source != "label" else [])
        if got:
            out.setdefault(_question(text), []).extend(got)
    return out


def _paired_ci(a, b, resamples=1000, seed=0):
    """(mean of a - b, 95% bootstrap interval) over paired per-question scores."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if not len(d) or not d.any():
        return 0.0, 0.0, 0.0
    means = d[np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def judge_units(kb, exs=None):
    """The canary's verdict on the KB's active units, per search mode: each held-out question searched with
    them and without them (BM25 and dense rank the sources alike either way, so one search serves both),
    scored by what a reader needs: where its answer is known, the reciprocal rank of
    the first hit holding it (MRR@10; a unit's text counts); else credit nDCG@10 of its relevant documents
    (a unit counts for the documents it carries sentences of). Held-out questions make no units (held_out), so each is ranked
    as a new question would be; a unit that still names one (made before the slice judged, or restored) is
    left out of that question's ranking. A mode where units are worse (the 95% bootstrap interval of the
    paired difference entirely below zero) is turned off; one where they are not is on. `exs`: examples(),
    when the caller has them."""
    cfg = kb.config["learning"]
    conn = kb.conn
    if not cfg["enabled"]:
        return {"status": "off", "reason": "learning.enabled is false"}
    _, held, wait = split(cfg, examples(conn) if exs is None else exs)
    if wait:
        return {"status": "skipped", "holdout": len(held), "reason": f"{wait}: units stay in use in every mode"}
    units = tuning_records.active_units(conn)
    if not units:
        return {"status": "skipped", "holdout": len(held), "reason": "no active units to judge"}
    texts = tuning_records.feedback_query_texts(conn)
    made_from, credit = {}, {}
    for uid, qids, docs in units:
        credit[uid] = json.loads(docs)
        for q in json.loads(qids):
            if q in texts:
                made_from.setdefault(_question(texts[q]), set()).add(uid)
    # a fixed sample of the slice (by the same hash) bounds the cost: 4 searches per question
    held = sorted(held, key=lambda e: hashlib.sha1(_question(e[0]).encode()).digest())[:int(cfg["canary_questions"])]
    cap = int(kb.config["retrieval"]["max_units"])
    known = _answers(conn)
    metrics = {}
    for mode in UNIT_MODES:
        with_u, without = [], []
        for text, rel in held:
            rel, own, answers = set(rel), made_from.get(_question(text), set()), known.get(_question(text))
            score = (lambda hits: _answer_rr10(hits, answers)) if answers else \
                (lambda hits: _credit_ndcg10(hits, rel, credit))
            hits = kb.search(text, k=30, mode=mode, log=False, max_units=-1).hits
            if mode == "hybrid":  # fused ranks shift around units: the sources alone are searched again
                without.append(score(kb.search(text, k=10, mode=mode, include_units=False, log=False).hits))
            else:  # one retriever scores each chunk on its own: the sources keep their order without units
                without.append(score([h for h in hits if h.kind != "unit"]))
            kept, n_units = [], 0
            for h in hits:
                if h.kind == "unit":
                    if h.doc_id in own or 0 <= cap <= n_units:
                        continue
                    n_units += 1
                kept.append(h)
            with_u.append(score(kept))
        delta, lo, hi = _paired_ci(with_u, without)
        metrics[mode] = {"with": round(float(np.mean(with_u)), 4), "without": round(float(np.mean(without)), 4),
                         "delta": round(delta, 4), "ci95": [round(lo, 4), round(hi, 4)]}
    # worse means worse beyond noise: the whole 95% interval of the paired difference below zero (a strict
    # comparison of two means turned units off and on from night to night on a few hundred questions)
    off = [m for m in UNIT_MODES if metrics[m]["ci95"][1] < 0]
    reason = ("units are not worse in any mode" if not off else
              "units rank the held-out questions worse in " + ", ".join(off) + ": searches there leave them out")
    return {"status": "judged", "off": off, "holdout": len(held), "units": len(units), "metrics": metrics,
            "reason": reason}


def units_off(conn):
    """The modes whose searches leave units out (the verdict of the newest run that judged them)."""
    return frozenset(json.loads(store.get_meta(conn, "units_off", "[]")))


def set_units_off(conn, modes):
    """Inside a write transaction: record the modes that leave units out. A change moves the log's head,
    so every process's searches see it at their next catch-up (it holds no chunks)."""
    modes = sorted(set(modes))
    if sorted(units_off(conn)) == modes:
        return
    store.set_meta(conn, "units_off", json.dumps(modes))
    record_change(conn, Change())


def restore_units_off(conn):
    """After a rollback: the verdict of the newest finished run still standing (none: units everywhere)."""
    for (counts,) in tuning_records.done_run_counts(conn):
        judged = json.loads(counts or "{}").get("unit_use")
        if judged and judged.get("status") == "judged":
            set_units_off(conn, judged["off"])
            return
    set_units_off(conn, ())
