"""Derived indexes: FAISS for dense vectors and an incremental BM25 engine, each saved beside a manifest."""

import json
import math
import os
import threading
import time
import zlib
from collections import Counter

import numpy as np

from .version import __version__
from .text import bm25_tokens, index_text

# ---- dense ---------------------------------------------------------------------------------


class DenseIndex:
    """Inner product over normalized vectors = cosine; ids are chunk ids."""

    def __init__(self, dim, kind="flat", hnsw_m=32):
        import faiss

        self.faiss = faiss
        self.dim, self.kind = dim, kind
        if kind == "hnsw":
            base = faiss.IndexHNSWFlat(dim, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
            base.hnsw.efSearch = 128
        elif kind == "flat":
            base = faiss.IndexFlatIP(dim)
        else:
            raise ValueError(f"unknown dense index kind {kind!r} (flat or hnsw)")
        self.index = faiss.IndexIDMap2(base)
        self.seq = 0  # the change-log sequence number this index reflects

    @property
    def count(self):
        return self.index.ntotal

    @property
    def can_remove(self):
        return self.kind == "flat"

    def add(self, ids, vectors):
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))

    def remove(self, ids):
        if len(ids):
            self.index.remove_ids(np.asarray(ids, dtype=np.int64))

    def search(self, qvec, n, mask=None):
        """Top-n (ids, scores); `mask` (boolean over chunk ids) restricts the search inside FAISS, as a
        bitmap the scan tests per vector."""
        if self.count == 0 or n <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        params = None
        if mask is not None:
            if not mask.any():
                return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
            bits = np.packbits(mask, bitorder="little")
            sel = self.faiss.IDSelectorBitmap(len(bits), self.faiss.swig_ptr(bits))  # n: bytes
            params = self.faiss.SearchParametersHNSW(sel=sel, efSearch=128) if self.kind == "hnsw" \
                else self.faiss.SearchParameters(sel=sel)
        scores, ids = self.index.search(np.asarray(qvec, dtype=np.float32).reshape(1, -1), min(n, self.count),
                                        params=params)
        keep = ids[0] >= 0
        return ids[0][keep], scores[0][keep]

    def save(self, path, manifest):
        """Temp file + rename, index first then manifest: a crash leaves a stale manifest, never a torn index."""
        tmp = _tmp_name(path)
        data = self.faiss.serialize_index(self.index)
        with open(tmp, "wb") as f:
            f.write(data.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        manifest = dict(manifest, package_version=__version__, faiss_version=self.faiss.__version__,
                        dim=self.dim, metric="inner_product", kind=self.kind, count=self.count,
                        crc32=zlib.crc32(data), bytes=len(data), seq=self.seq)
        write_json_atomic(path + ".manifest.json", manifest)

    @classmethod
    def load(cls, path, expect):
        """The saved index if its manifest matches `expect` (model_id, dim, kind, generation), else (None, why)."""
        manifest, why = read_manifest(path, expect)
        if manifest is None:
            return None, why
        import faiss

        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return None, "unreadable index file"
        # the checksum catches vectors overwritten under an intact header, and an index file and manifest
        # from two different saves (about 1 GB/s: a tenth of a second at 100k chunks)
        if len(data) != manifest.get("bytes") or zlib.crc32(data) != manifest.get("crc32"):
            return None, "corrupt index file (checksum differs from the manifest)"
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except Exception:
            return None, "corrupt index file"
        if index.ntotal != manifest.get("count") or index.d != manifest.get("dim"):
            return None, "corrupt index file (count or dim differs from manifest)"
        obj = cls.__new__(cls)
        obj.faiss, obj.dim, obj.kind, obj.index = faiss, index.d, manifest["kind"], index
        obj.seq = int(manifest.get("seq", -1))
        return obj, "ok"


def _fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(path, expect):
    """(manifest, "ok") when the file and its manifest exist and the manifest has every `expect` value."""
    mpath = path + ".manifest.json"
    if not os.path.exists(path) or not os.path.exists(mpath):
        return None, "missing"
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None, "corrupt manifest"
    for key, want in expect.items():
        if manifest.get(key) != want:
            return None, f"stale ({key} {manifest.get(key)!r} != {want!r})"
    return manifest, "ok"


def _tmp_name(path, stale_after=3600):
    """Per process and thread: two processes saving the same derived file never write one temp file.
    Temp files an hour old were left by a killed save: they are removed here."""
    folder, base = os.path.split(path)
    try:
        for name in os.listdir(folder or "."):
            full = os.path.join(folder, name)
            if name.startswith(base + ".") and name.endswith(".tmp") and time.time() - os.path.getmtime(full) > stale_after:
                os.remove(full)
    except OSError:
        pass
    return f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"


def write_json_atomic(path, obj):
    tmp = _tmp_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- BM25 ----------------------------------------------------------------------------------


_ID_DTYPE = np.uint32  # chunk ids on disk (SQLite rowids; a KB of 4 billion chunks would need int64)


class BM25:
    """Okapi BM25 scored exactly like rank-bm25's BM25Okapi, kept up to date by replaying the change log.

    The engine keeps what does not depend on the rest of the corpus: per term, the (chunk id, tf) postings
    and the document frequency; per chunk, its length and whether it is live. IDF, the epsilon floor and
    length normalisation are computed at query time for the query's terms only, so adding or removing a
    chunk touches that chunk's postings and nothing else. Removed chunks are tombstones until the next
    compaction (on save, or when a third of the postings are dead).

    Each posting of the compacted segment also holds its tf weight normalised by length, computed when the
    segment is made, as Lucene keeps norms; the average document length these use is
    refreshed when the true one has moved by more than AVGDL_DRIFT, so a one-document write does not make
    the next queries recompute their terms (scores then equal rank-bm25's with an average length within
    0.1%). Postings appended by writes are weighed on their term's next query and kept until the next write
    to that term."""

    FORMAT = 3  # of the saved arrays; bump when save() changes
    AVGDL_DRIFT = 1e-3
    MERGE_EXTRA = 8  # a term's appended segments are merged into one beyond this many

    def __init__(self, records=None, k1=1.2, b=0.75, epsilon=0.25, seq=0):
        """The engine over every live chunk of `records` (a store.Records, read in one snapshot); empty
        without one."""
        self.k1, self.b, self.epsilon, self.seq = float(k1), float(b), epsilon, int(seq)
        self.term_ids = {}                                   # term -> term id (SQLite's)
        self.df = np.zeros(1, dtype=np.int64)                # per term id: live chunks holding it
        self.doc_len = np.zeros(1, dtype=np.float32)         # per chunk id
        self.alive = np.zeros(1, dtype=bool)                 # per chunk id
        self.n_docs, self.total_len = 0, 0.0
        self._base = {}      # term id -> (start, end) into _ids/_tf: one compacted segment
        self._ids = np.zeros(0, dtype=np.int64)
        self._tf = np.zeros(0, dtype=np.uint16)
        self._w = np.zeros(0, dtype=np.float32)  # per posting of _ids: its tf weight (see above)
        self._wver = np.zeros(1, dtype=np.int64)  # per term id: the _version its weights in _w were made at
        self._extra = {}     # term id -> [(ids, tf)] appended by replayed adds
        self._extra_w = {}   # term id -> (_version, [weights per segment of _extra]), made on a query
        self._n_post, self._n_dead = 0, 0
        self._mean_idf = None
        self._local = threading.local()
        self._wkey, self._version = None, 0  # (k1, b, average length) the weights use; bumped with it
        if records is not None:
            with records.snapshot():  # the chunks and the sequence number they match
                self.build(records)

    # -- building and replaying

    def build(self, records):
        """Index every live chunk, in the caller's snapshot of the records."""
        self.seq = records.head()
        self.term_ids = records.terms()
        rows = records.chunks(["text", "title"])
        cids, lens, tids, tfs = self._tokenize(records, rows)
        counts_per_chunk = np.array([len(x) for x in tids], dtype=np.int64)
        self._grow_chunks(int(cids.max()) if len(cids) else 0)
        self.doc_len[cids] = lens
        self.alive[cids] = True
        self.n_docs, self.total_len = len(cids), float(lens.sum())
        if len(cids):
            tid = np.concatenate(tids) if tids else np.zeros(0, np.int64)
            ids = np.repeat(cids, counts_per_chunk)
            tf = np.concatenate(tfs) if tfs else np.zeros(0, np.float32)
            order = np.argsort(tid, kind="stable")  # by term, then chunk id (rows came in id order)
            tid, ids, tf = tid[order], ids[order], tf[order]
            uniq, counts = np.unique(tid, return_counts=True)
            self._set_base(uniq, counts, ids, tf)

    def _tokenize(self, records, rows):
        """(chunk ids, lengths, [term ids per chunk], [tfs per chunk]) for (id, text, title) rows; terms this
        engine has not met are looked up in the store's dictionary (the writer registered them)."""
        counted = [Counter(bm25_tokens(index_text(r[2], r[1]))) for r in rows]
        new = {t for c in counted for t in c if t not in self.term_ids}
        if new:
            records.term_ids(self.term_ids, new)
        cids = np.array([r[0] for r in rows], dtype=np.int64)
        lens = np.array([sum(c.values()) for c in counted], dtype=np.float32)
        get = self.term_ids.get
        tids = [np.array([get(t, -1) for t in c], dtype=np.int64) for c in counted]
        tfs = [np.fromiter(c.values(), dtype=np.float32, count=len(c)) for c in counted]
        for i, t in enumerate(tids):  # a term missing from the dictionary cannot be scored: leave it out
            if len(t) and t.min() < 0:
                tids[i], tfs[i] = t[t >= 0], tfs[i][t >= 0]
        return cids, lens, tids, tfs

    def _set_base(self, tids, counts, ids, tf):
        ends = np.cumsum(counts)
        starts = ends - counts
        self._ids, self._tf = ids, np.minimum(tf, 65535).astype(np.uint16)
        self._w = np.zeros(len(ids), dtype=np.float32)
        self._base = dict(zip(tids.tolist(), zip(starts.tolist(), ends.tolist())))
        self._extra, self._extra_w = {}, {}
        self._grow_terms(int(tids.max()) if len(tids) else 0)
        self._wver[:] = -1  # no term's weights are made yet
        self.df[:] = 0
        self.df[tids] = counts
        self._n_post, self._n_dead = len(ids), 0
        self._mean_idf = None
        self._weigh_base(tids)

    def _weigh_base(self, tids, block=1 << 20):
        """Every compacted posting's weight in one pass, when the segment is made (build, load, compaction),
        so a term's first query does not pay for it; a block at a time bounds the temporary arrays."""
        self._wkey, self._version = (self.k1, self.b, self.avgdl), self._version + 1
        for a in range(0, len(self._ids), block):
            self._w[a:a + block] = self._weigh(self._ids[a:a + block], self._tf[a:a + block])
        self._wver[tids] = self._version

    def _grow_chunks(self, top):
        if top >= len(self.alive):
            n = max(top + 1, 2 * len(self.alive))
            self.alive = np.concatenate([self.alive, np.zeros(n - len(self.alive), dtype=bool)])
            self.doc_len = np.concatenate([self.doc_len, np.zeros(n - len(self.doc_len), dtype=np.float32)])

    def _grow_terms(self, top):
        if top >= len(self.df):
            n = max(top + 1, 2 * len(self.df))
            self.df = np.concatenate([self.df, np.zeros(n - len(self.df), np.int64)])
            self._wver = np.concatenate([self._wver, np.full(n - len(self._wver), -1, np.int64)])

    def add(self, records, rows):
        """Make chunks live: (chunk id, text, title) rows of active chunks; those already live are skipped.
        `records`' term dictionary names the terms this engine has not met."""
        rows = [r for r in rows if int(r[0]) >= len(self.alive) or not self.alive[int(r[0])]]
        if not rows:
            return
        cids, lens, tids, tfs = self._tokenize(records, rows)
        self._grow_chunks(int(cids.max()))
        if self._n_dead and (self.doc_len[cids] > 0).any():
            self.compact()  # a chunk coming back (a restored unit): drop its old postings first
        self.doc_len[cids] = lens
        self.alive[cids] = True
        self.n_docs += len(cids)
        self.total_len += float(lens.sum())
        by_term = {}
        for cid, t, f in zip(cids.tolist(), tids, tfs):
            for tid, tf in zip(t.tolist(), f.tolist()):
                by_term.setdefault(tid, ([], []))
                by_term[tid][0].append(cid)
                by_term[tid][1].append(tf)
        if by_term:
            self._grow_terms(max(by_term))
        for tid, (c, f) in by_term.items():
            segs = self._extra.setdefault(tid, [])
            self._extra_w.pop(tid, None)
            segs.append((np.array(c, dtype=np.int64), np.array(f, dtype=np.float32)))
            if len(segs) > self.MERGE_EXTRA:  # many one-document writes: one array, not many, per query
                segs[:] = [(np.concatenate([x[0] for x in segs]), np.concatenate([x[1] for x in segs]))]
            self.df[tid] += len(c)
            self._n_post += len(c)
        self._mean_idf = None

    def remove(self, chunk_ids, postings):
        """Tombstone live chunks; `postings` ((term id, chunk id, tf) rows, from the change log) say which
        document frequencies fall."""
        ids = np.asarray(chunk_ids, dtype=np.int64)
        ids = ids[(ids < len(self.alive))]
        ids = ids[self.alive[ids]] if len(ids) else ids
        if not len(ids):
            return
        gone = np.zeros(len(self.alive), dtype=bool)
        gone[ids] = True
        rows = np.asarray(postings, dtype=np.int64).reshape(-1, 3)
        rows = rows[(rows[:, 1] < len(gone))]
        rows = rows[gone[rows[:, 1]]]
        np.subtract.at(self.df, rows[:, 0], 1)
        self.alive[ids] = False
        self.n_docs -= len(ids)
        self.total_len -= float(self.doc_len[ids].sum())
        self._n_dead += len(rows)
        self._mean_idf = None
        if self._n_dead * 3 > self._n_post:
            self.compact()

    def compact(self):
        """Merge the appended segments into one and drop the postings of removed chunks."""
        tids, counts, ids, tfs = [], [], [], []
        for tid in sorted(set(self._base) | set(self._extra)):
            a, t = self._postings(tid)
            keep = self.alive[a]
            if keep.any():
                tids.append(tid)
                counts.append(int(keep.sum()))
                ids.append(a[keep])
                tfs.append(t[keep])
        self._set_base(np.array(tids, dtype=np.int64), np.array(counts, dtype=np.int64),
                       np.concatenate(ids) if ids else np.zeros(0, np.int64),
                       np.concatenate(tfs) if tfs else np.zeros(0, np.float32))

    # -- scoring

    def _postings(self, tid):
        parts = []
        if tid in self._base:
            a, b = self._base[tid]
            parts.append((self._ids[a:b], self._tf[a:b]))
        parts += self._extra.get(tid, [])
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _weigh(self, ids, tf):
        """BM25's tf weight for postings (k1 + 1) tf / (tf + k1 (1 - b + b len / avgdl)), at _wkey."""
        k1, b, avgdl = self._wkey
        tf = tf.astype(np.float64)
        return tf * (k1 + 1) / (tf + k1 * (1 - b + b * self.doc_len[ids] / avgdl))

    def _term(self, tid):
        """(live chunk ids, their tf weights) of a term: the compacted segment's weights are made once."""
        parts = []
        span = self._base.get(tid)
        if span is not None:
            a, e = span
            if self._wver[tid] != self._version:
                self._w[a:e] = self._weigh(self._ids[a:e], self._tf[a:e])
                self._wver[tid] = self._version
            parts.append((self._ids[a:e], self._w[a:e]))
        extra = self._extra.get(tid)
        if extra:  # weighed on the term's first query after a write (or a drift), then kept
            made = self._extra_w.get(tid)
            if made is None or made[0] != self._version:
                made = self._extra_w[tid] = (self._version, [self._weigh(i, f).astype(np.float32) for i, f in extra])
            parts += [(ids, w) for (ids, _), w in zip(extra, made[1])]
        if len(parts) == 1:
            ids, w = parts[0]
        elif parts:
            ids, w = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        else:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if self._n_dead:  # tombstones: skip the postings of removed chunks
            live = self.alive[ids]
            ids, w = ids[live], w[live]
        return ids, w

    def idf(self, tid):
        """rank-bm25's IDF: log((N - df + 0.5) / (df + 0.5)), and epsilon x the mean IDF where negative."""
        df = float(self.df[tid])
        raw = math.log(self.n_docs - df + 0.5) - math.log(df + 0.5) if self.n_docs - df + 0.5 > 0 else -math.inf
        if raw >= 0:
            return raw
        if self._mean_idf is None:  # the mean over the vocabulary: once per change, not per query
            d = self.df[self.df > 0].astype(np.float64)
            self._mean_idf = float((np.log(self.n_docs - d + 0.5) - np.log(d + 0.5)).mean()) if len(d) else 0.0
        return self.epsilon * self._mean_idf

    @property
    def avgdl(self):
        return self.total_len / self.n_docs if self.n_docs else 1.0

    def _scratch(self):
        """A per-thread score array as long as the chunk ids, all zero between searches."""
        mine = getattr(self._local, "scratch", None)
        if mine is None or len(mine) < len(self.doc_len):
            mine = np.zeros(len(self.doc_len), dtype=np.float64)
            self._local.scratch = mine
        return mine

    def search(self, query, n, mask=None):
        """Top-n (chunk ids, scores) for a query string; `mask` (boolean over chunk ids) restricts it.

        Term at a time over the query's postings only (a query touches about 1% of the chunks): no array
        as long as the corpus is made or scanned per query."""
        key, avgdl = self._wkey, self.avgdl
        if key is None or key[0] != self.k1 or key[1] != self.b or abs(avgdl - key[2]) > self.AVGDL_DRIFT * key[2]:
            self._wkey, self._version = (self.k1, self.b, avgdl), self._version + 1  # every weight is stale
        ids_parts, score_parts = [], []
        for term in bm25_tokens(query):
            tid = self.term_ids.get(term)
            if tid is None or tid >= len(self.df) or self.df[tid] <= 0:
                continue
            ids, w = self._term(tid)
            ids_parts.append(ids)
            score_parts.append(self.idf(tid) * w)
        if not ids_parts or n < 1:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        many = len(ids_parts) > 1  # else each chunk once (a term with idf 0 still matches)
        ids = np.concatenate(ids_parts) if many else ids_parts[0]
        scores = np.concatenate(score_parts) if many else score_parts[0]
        if many:  # every occurrence of a chunk gets its chunk's sum, from this thread's zeroed scratch array
            acc = self._scratch()
            np.add.at(acc, ids, scores.astype(np.float64))  # same types: numpy's fast path
            scores = acc[ids]
            acc[ids] = 0.0
        if mask is not None:
            keep = ids < len(mask)
            keep[keep] = mask[ids[keep]]
            ids, scores = ids[keep], scores[keep]
        # a chunk occurs at most once per query term, so the m-th best occurrence (of all, or of a sample)
        # scores no more than the n-th best chunk: what scores below it cannot be in the top n
        m = n * len(ids_parts)
        if len(ids) > 2 * m:
            sample = scores[::4] if len(scores) >= 8 * m else scores
            keep = scores >= np.partition(sample, len(sample) - m)[len(sample) - m]
            ids, scores = ids[keep], scores[keep]
        order = np.lexsort((ids, -scores))  # best first; ties by chunk id
        ids, scores = ids[order], scores[order]
        if many and len(ids) > 1:  # a chunk's occurrences share its score, so they are now side by side
            keep = np.empty(len(ids), dtype=bool)
            keep[0] = True
            np.not_equal(ids[1:], ids[:-1], out=keep[1:])
            ids, scores = ids[keep], scores[keep]
        return ids[:n].astype(np.int64), scores[:n].astype(np.float32)

    # -- files

    def save(self, path, manifest):
        """Persist the compacted arrays (temp file + rename, then the manifest) with the sequence they match."""
        self.compact()
        tids = np.array(sorted(self._base), dtype=np.int64)
        bounds = np.array([self._base[t] for t in tids.tolist()], dtype=np.int64).reshape(-1, 2)
        by_id = {v: k for k, v in self.term_ids.items()}
        terms = [by_id.get(t, "") for t in tids.tolist()]
        manifest = dict(manifest, format=self.FORMAT, seq=self.seq, package_version=__version__,
                        n_docs=self.n_docs, n_terms=len(terms))
        tmp = _tmp_name(path)
        with open(tmp, "wb") as f:
            np.savez(f, manifest=np.frombuffer(json.dumps(manifest, sort_keys=True).encode("utf-8"), dtype=np.uint8),
                     doc_len=self.doc_len.astype(np.uint32), alive=self.alive,
                     terms=np.frombuffer("\n".join(terms).encode("utf-8"), dtype=np.uint8),
                     tids=tids, counts=bounds[:, 1] - bounds[:, 0], ids=self._ids.astype(_ID_DTYPE),
                     tf=np.minimum(self._tf, 65535).astype(np.uint16))  # 6 bytes a posting on disk
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        write_json_atomic(path + ".manifest.json", manifest)

    @classmethod
    def load(cls, path, expect, k1=1.2, b=0.75, epsilon=0.25):
        """The saved engine if its manifest matches `expect` (the KB it belongs to), else (None, why)."""
        manifest, why = read_manifest(path, dict(expect, format=cls.FORMAT, package_version=__version__))
        if manifest is None:
            return None, why
        obj = cls(None, k1, b, epsilon, seq=int(manifest.get("seq", -1)))
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in ("manifest", "doc_len", "alive", "terms", "tids", "counts", "ids", "tf")}
            inner = json.loads(arrays["manifest"].tobytes().decode("utf-8"))
        except Exception:
            return None, "corrupt file"
        if inner != manifest:  # two processes saving at once: file and manifest differ
            return None, "file and manifest from different saves"
        terms = arrays["terms"].tobytes().decode("utf-8").split("\n") if len(arrays["terms"]) else []
        if len(terms) != manifest.get("n_terms") or len(arrays["tids"]) != len(terms) \
                or int(arrays["counts"].sum()) != len(arrays["ids"]) or len(arrays["ids"]) != len(arrays["tf"]) \
                or int(arrays["alive"].sum()) != manifest.get("n_docs"):
            return None, "corrupt file (sizes differ from the manifest)"
        obj.doc_len, obj.alive = arrays["doc_len"].astype(np.float32), arrays["alive"].astype(bool)
        obj.n_docs, obj.total_len = int(manifest["n_docs"]), float(obj.doc_len[obj.alive].sum())
        obj._set_base(arrays["tids"].astype(np.int64), arrays["counts"].astype(np.int64),
                      arrays["ids"].astype(np.int64), arrays["tf"])
        obj.term_ids = dict(zip(terms, arrays["tids"].tolist()))
        return obj, "ok"
