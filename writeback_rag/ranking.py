"""Learned rerankers, one per search mode: a linear score over features of each of the top source candidates
(their fused, BM25 and dense evidence, and how the question's words sit in the passage: in one sentence, in
two adjacent ones, in the title, as word pairs), fitted by the nightly write-back on the feedback's
questions and adopted only when the held-out slice says so (tuning.py).

RRF fixes how the two retrievers' ranks combine, and each retriever alone ranks by one signal; feedback says
which passages answered. A ranker learns that from the feedback, for questions nobody asked before, and
costs a few milliseconds per search: it reads
the text of the top DEPTH candidates and the document frequencies of the question's words (kept by the
record store for every backend). It reorders those candidates within the slots they held, so units and the
fused scores' scale are left as they were."""

import functools
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass

import numpy as np

from .text import bm25_tokens, sentences

DEPTH = 30  # source candidates the ranker reorders
FEATURES = ("log fused score", "fused rank", "bm25 rrf term", "dense rrf term", "bm25 / best bm25", "cosine",
            "cosine - best cosine", "words in passage", "words in best sentence", "words in best two sentences",
            "words in title", "word pairs in passage", "word stems in best sentence")
CROSS_FEATURES = ("cross-encoder score", "cross-encoder score - best")  # with a learned cross-encoder
_SUFFIX = re.compile(r"(ing|ed|es|s|ly)$")
_ABSENT = 100  # the rank a candidate missing from one retriever's list is given


_STEMS: dict[str, str] = {}


def _stem(word):
    """A crude suffix strip, so that 'founded' meets 'found' and 'cities' nearly meets 'city'. Remembered (a
    vocabulary repeats) and interned, so every parse kept below shares one copy of each word."""
    out = _STEMS.get(word)
    if out is None:
        if len(_STEMS) > 200_000:
            _STEMS.clear()
        out = _STEMS[word] = sys.intern(_SUFFIX.sub("", word) if len(word) > 4 else word)
    return out


@dataclass(frozen=True)
class Ranker:
    """Linear weights over standardized features ((x - mean) / scale). With `first`, a ranker that also
    weighs a cross-encoder's score (FEATURES + CROSS_FEATURES): `first` (over FEATURES) picks the
    candidates the cross-encoder reads (with_cross_encoder), and ranks alone where there is no cross-encoder."""
    weights: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    first: "Ranker | None" = None

    @property
    def features(self):
        return FEATURES + CROSS_FEATURES if self.first is not None else FEATURES

    def score(self, X):
        return ((np.asarray(X, dtype=np.float64) - self.mean) / self.scale) @ self.weights

    def to_dict(self):
        out = {"features": list(self.features), "weights": self.weights.tolist(), "mean": self.mean.tolist(),
               "scale": self.scale.tolist()}
        if self.first is not None:
            out["first"] = self.first.to_dict()
        return out

    @classmethod
    def from_dict(cls, o):
        """None when stored for another feature set (an older or newer version): such a ranker is not used."""
        first = cls.from_dict(o["first"]) if isinstance(o.get("first"), dict) else None
        if o.get("features") != list(FEATURES + CROSS_FEATURES if first is not None else FEATURES):
            return None
        return cls(*(np.asarray(o[k], dtype=np.float64) for k in ("weights", "mean", "scale")), first=first)


def dumps(rankers):
    """{search mode: Ranker} as JSON (None when there is none)."""
    return json.dumps({m: r.to_dict() for m, r in sorted(rankers.items())}) if rankers else None


def loads(text):
    """{search mode: Ranker} from dumps(); a ranker stored for another feature set is left out."""
    if not text:
        return {}
    o = json.loads(text)
    out = {m: Ranker.from_dict(v) for m, v in o.items()}
    return {m: r for m, r in out.items() if r is not None}


def idf(records, words, n_chunks):
    """{word: BM25 IDF} from the record store's document frequencies (a word it has never seen counts as rare)."""
    words = sorted(set(words))
    df = records.df(words)
    n = max(int(n_chunks), 1)
    return {w: math.log(1 + (n - df.get(w, 0) + 0.5) / (df.get(w, 0) + 0.5)) for w in words}


@functools.lru_cache(maxsize=2048)
def _parse(title, text):
    """What the features read of a passage: its words, its sentences' words, their stems, its stemmed word
    pairs, the title's words. Cached (a KB's top candidates recur across searches): parsing is most of a
    reranked search's cost; about 20 KiB per passage kept, so at most ~40 MiB."""
    words = [[sys.intern(w) for w in bm25_tokens(s)] for s in sentences(text)] or [[]]
    stemmed = [[_stem(w) for w in ws] for ws in words]
    stems = [w for ws in stemmed for w in ws]
    sent = [frozenset(ws) for ws in words]
    return (frozenset().union(*sent), sent, [frozenset(ws) for ws in stemmed],
            frozenset(zip(stems, stems[1:])), frozenset(bm25_tokens(title)))


def features(query, cands, fused, bm, dn, texts, weights, rrf_k):
    """(len(cands), len(FEATURES)) array for candidates `cands` (in fused order) of one question. `fused`,
    `bm`, `dn`: {chunk id: score} of the fusion and each retriever's list; `texts`: store.Records.passages(); `weights`:
    idf() of the question's words."""
    words = frozenset(bm25_tokens(query))
    total = sum(weights.get(w, 0.0) for w in words) or 1.0
    stem_weight = {}
    for w in words:
        stem_weight[_stem(w)] = max(stem_weight.get(_stem(w), 0.0), weights.get(w, 0.0))
    stems = [_stem(w) for w in bm25_tokens(query)]
    pairs = set(zip(stems, stems[1:]))
    rank_bm = {c: i for i, c in enumerate(sorted(bm, key=lambda c: (-bm[c], c)))}
    rank_dn = {c: i for i, c in enumerate(sorted(dn, key=lambda c: (-dn[c], c)))}
    best_bm = max(bm.values(), default=0.0) or 1.0
    best_dn = max(dn.values(), default=0.0)

    # a passage's sentences hold few of the question's words, and the same few recur across sentences and
    # candidates: each subset's weight is summed once per question
    stem_keys, shares, stem_shares = frozenset(stem_weight), {}, {}

    def share(found):  # the share of the question's words' weight that a subset of them carries
        out = shares.get(found)
        if out is None:
            out = shares[found] = sum(weights.get(w, 0.0) for w in found) / total
        return out

    def stem_share(found):
        out = stem_shares.get(found)
        if out is None:
            out = stem_shares[found] = sum(stem_weight[w] for w in found) / total
        return out

    def cover(ws):
        return share(words & ws)

    rows = []
    for i, c in enumerate(cands):
        passage, sent, stem_sent, passage_pairs, title = _parse(*texts.get(c, ("", "")))
        found = [words & s for s in sent]  # the question's words in each sentence
        sent_cover = [share(f) for f in found]
        two = max((share(a | b) for a, b in zip(found, found[1:])), default=sent_cover[0])
        stems_in = max(stem_share(stem_keys & s) for s in stem_sent)
        rows.append([math.log(max(fused[c], 1e-12)), 1.0 / (1 + i),
                     1.0 / (rrf_k + 1 + rank_bm.get(c, _ABSENT)), 1.0 / (rrf_k + 1 + rank_dn.get(c, _ABSENT)),
                     bm.get(c, 0.0) / best_bm, dn.get(c, 0.0), dn.get(c, 0.0) - best_dn if c in dn else -1.0,
                     cover(passage), max(sent_cover), max(two, max(sent_cover)), cover(title),
                     len(pairs & passage_pairs) / (len(pairs) or 1), stems_in])
    return np.asarray(rows, dtype=np.float64).reshape(len(cands), len(FEATURES))


def candidates(fused, is_unit=None):
    """The top DEPTH source candidates in fused order (units are not reordered)."""
    order = sorted(fused, key=lambda c: (-fused[c], c))
    return list(itertools.islice((c for c in order if is_unit is None or not is_unit(c)), DEPTH))


def inputs(records, query, fused, bm, dn, rrf_k, n_chunks, is_unit=None, weights=None):
    """(candidates, features) of one question's lists, read from the store: what a search reranks and what a
    ranker learns from are built alike. Units are left out of the candidates and of the retrievers' ranks;
    `weights`: idf() of the question's words, when the caller has them."""
    cands = candidates(fused, is_unit)
    if is_unit is not None:
        bm, dn = ({c: s for c, s in d.items() if not is_unit(c)} for d in (bm, dn))
    if weights is None:
        weights = idf(records, bm25_tokens(query), n_chunks)
    return cands, features(query, cands, fused, bm, dn, records.passages(cands), weights, rrf_k)


def with_cross_encoder(first, cands, X, score, top):
    """X with CROSS_FEATURES appended: `score(chunk ids)` (a cross-encoder's scores) reads the `top` best
    candidates by the ranker `first`; the others get the lowest of those scores minus one."""
    if not len(cands):
        return np.zeros((0, X.shape[1] + len(CROSS_FEATURES)))
    s = first.score(X)
    best = sorted(range(len(cands)), key=lambda i: (-s[i], i))[:top]
    got = np.asarray(score([cands[i] for i in best]), dtype=np.float64)
    v = np.full(len(cands), got.min() - 1.0)
    v[best] = got
    return np.hstack([X, v[:, None], (v - v.max())[:, None]])


def rerank_inputs(ranker, cands, X, score, top):
    """(ranker, features) a search reorders with: a ranker that weighs a cross-encoder gets `score`'s
    reading of its first ranker's best `top` (with_cross_encoder); where `score` is None (no cross-encoder
    to read) its first ranker ranks alone."""
    if ranker.first is None:
        return ranker, X
    if score is None:
        return ranker.first, X
    return ranker, with_cross_encoder(ranker.first, cands, X, score, top)


def reorder(ranker, fused, cands, X):
    """`fused` with `cands` (fused order) reordered by the ranker within the slots they held: the i-th best
    by the ranker takes the i-th of their fused scores."""
    if len(cands) < 2:
        return fused
    s = ranker.score(X)
    order = sorted(range(len(cands)), key=lambda i: (-s[i], i))
    slots = [fused[c] for c in cands]
    out = dict(fused)
    for slot, i in zip(slots, order):
        out[cands[i]] = slot
    return out


def fit(questions, epochs=30, lr=0.01, decay=1e-4, seed=0, first=None):
    """A Ranker from [(X, y)] per question (y: 1 for candidates from a relevant document), by a softmax over
    each question's candidates that puts its relevant ones first. None with no question that has both.
    `first`: the ranker that chose what a cross-encoder read (X then has CROSS_FEATURES too)."""
    import torch

    questions = [(X, y) for X, y in questions if len(X) and np.any(y) and not np.all(y)]
    if not questions:
        return None
    allX = np.concatenate([X for X, _ in questions])
    mean, scale = allX.mean(0), allX.std(0) + 1e-6
    n, width = len(questions), allX.shape[1]
    Xs = np.zeros((n, DEPTH, width), np.float32)
    pos = np.zeros((n, DEPTH), bool)
    valid = np.zeros((n, DEPTH), bool)
    for j, (X, y) in enumerate(questions):
        m = min(len(X), DEPTH)
        Xs[j, :m] = (X[:m] - mean) / scale
        pos[j, :m], valid[j, :m] = np.asarray(y[:m]) > 0, True
    Xt, Pt, Vt = torch.from_numpy(Xs), torch.from_numpy(pos), torch.from_numpy(valid)
    gen = torch.Generator().manual_seed(seed)
    w = torch.zeros(width, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr, weight_decay=decay)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, 64):
            b = perm[s:s + 64]
            S = (Xt[b] @ w).masked_fill(~Vt[b], -1e9)
            loss = -(torch.logsumexp(S.masked_fill(~Pt[b], -1e9), 1) - torch.logsumexp(S, 1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return Ranker(w.detach().numpy().astype(np.float64), mean, scale, first)
