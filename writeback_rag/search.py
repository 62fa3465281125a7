"""Search: hybrid retrieval over one KB's derived indexes (BM25 and dense, fused), the unit cap, the learned
reranker, and the query log. The KnowledgeBase facade hands a search to it; the indexes and the records are
read through the objects it is given, never through the facade."""

import json
import time
from dataclasses import asdict, dataclass, field

from . import crossencoder, ranking, store
from .errors import InputError, StorageError
from .filters import Filter
from .store import querylog
from .tuning import FUSIONS, UNTUNED, Active, fuse, units_off

MODES = ("bm25", "dense", "hybrid")


@dataclass
class Hit:
    """One retrieved chunk: its document, text and scores (`bm25`/`dense`: the retrievers' own, when it
    was in their list), and the document's `source` and metadata for citations."""

    rank: int
    chunk_id: int
    doc_id: str
    title: str
    text: str
    kind: str
    score: float
    bm25: float | None = None
    dense: float | None = None
    source: str | None = None
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SearchResult:
    """A search's hits and its `query_id` (None when not logged): feedback names the query by it."""

    query_id: int | None
    query: str
    mode: str
    hits: list[Hit]
    latency_ms: float

    def to_dict(self) -> dict:
        return {"query_id": self.query_id, "query": self.query, "mode": self.mode,
                "latency_ms": round(self.latency_ms, 2), "hits": [h.to_dict() for h in self.hits]}



class Search:
    """One KB's searches in one process. `indexes`, `records`, `conn`, `embedder`: callables giving the KB's
    indexes.Indexes (reindex can move them), this thread's store.Records and connection, and the embedding
    model; the adopted tuning, the canary's verdict and hit
    rows are kept per change-log head."""

    ROW_CACHE = 4096  # hits' rows kept between searches (_hits)

    def __init__(self, path, config, indexes, records, conn, embedder, readonly=False):
        self.path, self.config, self.readonly = path, config, readonly
        self._indexes, self._records, self._conn, self._embedder = indexes, records, conn, embedder
        self.tuning = Active()  # the adopted tuning, read again when the head moves
        self._at_head = (None, frozenset())  # see _units_off
        self._rows = (None, {})  # see _hits

    def search(self, query, k=5, mode=None, filters=None, include_units=True, log=True, source="api", fusion=None,
               max_units=None):
        """Retrieve the top-k chunks. `mode`: bm25, dense or hybrid (default: retrieval.mode); `filters`:
        {source: glob or substring, doc: glob, kind: source|unit, KEY: metadata value}; units take at most
        `max_units` slots (default: retrieval.max_units, and none in a mode where write-back's canary found them
        worse: stats()["units_off"]; -1: no cap). Every call is logged (its query id is
        in the result, for feedback) unless log=False."""
        if not isinstance(query, str) or not query.strip():
            raise InputError("empty query; give the question text")
        mode = mode or self.config["retrieval"]["mode"]
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if int(k) < 1:
            raise InputError("k must be at least 1")
        if mode != "bm25":
            self._embedder()  # a first call loads the model; that is not query latency
        t0 = time.perf_counter()
        r = self.config["retrieval"]
        fusion = fusion or r["fusion"]
        unit_fusion = r["unit_fusion"]
        if fusion not in FUSIONS:
            raise InputError(f"unknown fusion {fusion!r}; use one of {', '.join(FUSIONS)}")
        where = Filter.parse(filters, include_units)
        head = self._indexes().catch_up(self._records(), dense=mode != "bm25", bm25=mode != "dense")
        if max_units is None and where.kinds == {"source", "unit"} and mode in self._units_off(head):
            where = where.only("source")  # the canary found units worse in this mode (tuning.judge_units)
        kinds = self._indexes().kinds
        units = "unit" in where.kinds and kinds.counts["unit"] > 0
        tuning = self.tuning.get(self._conn(), head) if r["learned"] else UNTUNED
        qv = tuning.query_vector(self._embedder().encode([query])[0], mode) if mode != "bm25" else None
        # separate candidate lists for sources and units, as if units had their own index (the paper's
        # layout): units never shift the ranks the sources fuse on
        parts = (where.only("source"), where.only("unit")) if units and unit_fusion == "separate" else (where,)
        cap = int(r["max_units"] if max_units is None else max_units)
        ranker = tuning.rankers.get(mode)
        # a ranker reorders the top DEPTH sources whatever k is asked for, as it learned to (hybrid has more)
        depth = max(int(r["candidates"]), 2 * k) if mode == "hybrid" else max(k, ranking.DEPTH) if ranker else k
        while True:
            fused, bm_all, dn_all, deeper = {}, {}, {}, False
            for part in parts:
                bm, dn = self._candidates(query, qv, mode, part, depth)
                fused.update(fuse(bm, dn, mode, fusion, int(tuning.rrf_k or r["rrf_k"]), float(r["dense_weight"]),
                                  tuning.bm25_weight))
                bm_all.update(bm)
                dn_all.update(dn)
                deeper = deeper or len(bm) >= depth or len(dn) >= depth
            if ranker is not None:
                fused = self._rerank(ranker, tuning, query, fused, bm_all, dn_all, int(tuning.rrf_k or r["rrf_k"]))
            top = self._top(fused, k, cap, units)
            # units over the cap were dropped and left fewer than k hits: look deeper (ranks above stay)
            if len(top) >= k or not units or cap < 0 or not deeper:
                break
            depth *= 2
        hits = self._hits(top, bm_all, dn_all, head)
        latency = (time.perf_counter() - t0) * 1000
        if log and self.readonly:
            raise StorageError(f"{self.path}: opened read-only, so this query cannot be logged",
                               cli="add --no-log, or make the folder writable", api="search with log=False")
        qid = self._log(query, mode, k, {"filters": filters or {}, "include_units": include_units, "fusion": fusion,
                                         "tuning": tuning.id}, latency, hits, source) if log else None
        return SearchResult(qid, query, mode, hits, latency)

    def _candidates(self, query, qv, mode, where, n):
        """({chunk id: BM25 score}, {chunk id: cosine}) of the top n per retriever within `where`."""
        return self._indexes().scores(self._records(), query, qv, n, where, sparse=mode in ("bm25", "hybrid"),
                                    dense=mode in ("dense", "hybrid"))

    def _rerank(self, ranker, tuning, query, fused, bm, dn, rrf_k):
        """The learned ranker's order of the top source candidates, within the slots they held (ranking.py);
        a ranker that reads a cross-encoder gets its scores of its first ranker's best (crossencoder.py)."""
        kinds = self._indexes().kinds
        cands, X = ranking.inputs(self._records(), query, fused, bm, dn, rrf_k, sum(kinds.counts.values()), kinds.is_unit)
        score = tuning.cross_scorer(self._embedder(), self._records(), query) if ranker.first is not None else None
        ranker, X = ranking.rerank_inputs(ranker, cands, X, score, crossencoder.TOP)
        return ranking.reorder(ranker, fused, cands, X)

    def _top(self, fused, k, cap, units):
        """Best k by fused score, at most `cap` of them knowledge units (-1: no cap), so units
        cannot crowd the original documents out of the top k."""
        ranked = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))
        if not units or cap < 0:
            return ranked[:k]
        is_unit = self._indexes().kinds.is_unit
        out, n_units = [], 0
        for cid, score in ranked:
            if is_unit(cid):
                if n_units >= cap:
                    continue
                n_units += 1
            out.append((cid, score))
            if len(out) == k:
                break
        return out

    def _units_off(self, head):
        """Modes whose searches leave units out (the canary's verdict, tuning.set_units_off): read again only
        when the change log's head has moved, as setting it moves the head."""
        kept = self._at_head
        if kept[0] != head:
            kept = (head, units_off(self._conn()))
            self._at_head = kept
        return kept[1]

    def _hits(self, top, bm, dn, head):
        """Hits for (chunk id, score) pairs: each chunk with its document's header, read in one statement and
        kept until the change log's head moves (a chunk's text never changes; its document's header and
        status change only in writes that move the head), as search engines keep stored fields in a block
        cache. At most ROW_CACHE rows are kept; a thread that saw another head fills its own dict."""
        if not top:
            return []
        kept = self._rows
        if kept[0] != head or len(kept[1]) > self.ROW_CACHE:
            kept = (head, {})
            self._rows = kept
        rows = kept[1]
        missing = [cid for cid, _ in top if cid not in rows]
        if missing:
            for r in self._records().hits(missing):
                rows[r[0]] = r
        out = []
        for cid, score in top:
            row = rows.get(cid)
            if row is None:  # deleted by another process since the index was loaded
                continue
            _, doc_id, text, title, kind, source, meta = row
            out.append(Hit(len(out) + 1, cid, doc_id, title, text, kind, float(score), bm.get(cid), dn.get(cid),
                           source, json.loads(meta) if meta and meta != "{}" else {}))
        return out

    def _log(self, query, mode, k, params, latency, hits, source):
        conn = self._conn()
        with store.transaction(conn):
            return querylog.log(conn, query, mode, k, params, latency, hits, source)
