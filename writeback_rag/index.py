"""Derived indexes: FAISS for dense vectors (file + manifest) and BM25 over postings kept in SQLite."""

import json
import os
import threading
import time
import zlib
from collections import Counter

import numpy as np

from .version import __version__
from .text import bm25_tokens

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

    def search(self, qvec, n, allowed=None):
        """Top-n (ids, scores); `allowed` (array of chunk ids) restricts the search via an IDSelector."""
        if self.count == 0 or n <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        params = None
        if allowed is not None:
            allowed = np.asarray(allowed, dtype=np.int64)
            if len(allowed) == 0:
                return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
            sel = self.faiss.IDSelectorBatch(len(allowed), self.faiss.swig_ptr(allowed))
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


def write_postings(conn, term_ids, chunk_id, text):
    """Index one chunk inside the caller's transaction; returns its BM25 length."""
    counts = Counter(bm25_tokens(text))
    rows = []
    for term, tf in counts.items():
        tid = term_ids.get(term)
        if tid is None:
            conn.execute("INSERT OR IGNORE INTO terms(term) VALUES (?)", (term,))
            tid = conn.execute("SELECT id FROM terms WHERE term=?", (term,)).fetchone()[0]
            term_ids[term] = tid
        rows.append((tid, chunk_id, tf))
    conn.executemany("INSERT OR REPLACE INTO postings(term_id, chunk_id, tf) VALUES (?,?,?)", rows)
    return sum(counts.values())


def load_term_ids(conn):
    return {term: tid for tid, term in conn.execute("SELECT id, term FROM terms")}


class BM25:
    """Okapi BM25 scored exactly like rank-bm25's BM25Okapi, kept up to date by replaying the change log.

    The engine keeps what does not depend on the rest of the corpus: per term, the (chunk id, tf) postings
    and the document frequency; per chunk, its length and whether it is live. IDF, the epsilon floor and
    length normalisation are computed at query time for the query's terms only, so adding or removing a
    chunk touches that chunk's postings and nothing else. Removed chunks are tombstones until the next
    compaction (on save, or when a third of the postings are dead)."""

    FORMAT = 2  # of the saved arrays; bump when save() changes

    def __init__(self, conn=None, k1=1.2, b=0.75, epsilon=0.25, seq=0):
        """The engine over every active chunk in `conn` (read in one snapshot); empty without a conn."""
        self.k1, self.b, self.epsilon, self.seq = float(k1), float(b), epsilon, int(seq)
        self.term_ids = {}                                   # term -> term id (SQLite's)
        self.df = np.zeros(1, dtype=np.int64)                # per term id: live chunks holding it
        self.doc_len = np.zeros(1, dtype=np.float32)         # per chunk id
        self.alive = np.zeros(1, dtype=bool)                 # per chunk id
        self.n_docs, self.total_len = 0, 0.0
        self._base = {}      # term id -> (start, end) into _ids/_tf: one compacted segment
        self._ids = np.zeros(0, dtype=np.int64)
        self._tf = np.zeros(0, dtype=np.float32)
        self._extra = {}     # term id -> [(ids, tf)] appended by replayed adds
        self._n_post, self._n_dead = 0, 0
        self._mean_idf = None
        if conn is not None:
            self._load_sql(conn)

    # -- building and replaying

    def _load_sql(self, conn):
        from .changes import head

        conn.execute("BEGIN")  # one snapshot: the arrays and the sequence number they match
        try:
            self.seq = head(conn)
            lens = np.array([tuple(r) for r in conn.execute(
                "SELECT c.id, c.bm25_len FROM chunks c JOIN documents d ON d.id=c.doc_id WHERE d.status='active'")],
                dtype=np.int64).reshape(-1, 2)
            rows = conn.execute("SELECT p.term_id, t.term, group_concat(p.chunk_id), group_concat(p.tf) FROM postings p "
                                "JOIN terms t ON t.id=p.term_id GROUP BY p.term_id ORDER BY p.term_id").fetchall()
        finally:
            conn.execute("COMMIT")
        self._grow_chunks(int(lens[:, 0].max()) if len(lens) else 0)
        self.doc_len[lens[:, 0]] = lens[:, 1]
        self.alive[lens[:, 0]] = True
        self.n_docs, self.total_len = len(lens), float(lens[:, 1].sum())
        if rows:
            tids = np.array([r[0] for r in rows], dtype=np.int64)
            counts = np.array([r[2].count(",") + 1 for r in rows], dtype=np.int64)
            ids = np.array(",".join(r[2] for r in rows).split(","), dtype=np.int64)
            tf = np.array(",".join(r[3] for r in rows).split(","), dtype=np.float32)
            self.term_ids = {r[1]: r[0] for r in rows}
            self._set_base(tids, counts, ids, tf)

    def _set_base(self, tids, counts, ids, tf):
        ends = np.cumsum(counts)
        starts = ends - counts
        self._ids, self._tf = ids, tf
        self._base = dict(zip(tids.tolist(), zip(starts.tolist(), ends.tolist())))
        self._extra = {}
        self._grow_terms(int(tids.max()) if len(tids) else 0)
        self.df[:] = 0
        self.df[tids] = counts
        self._n_post, self._n_dead = len(ids), 0
        self._mean_idf = None

    def _grow_chunks(self, top):
        if top >= len(self.alive):
            n = max(top + 1, 2 * len(self.alive))
            self.alive = np.concatenate([self.alive, np.zeros(n - len(self.alive), dtype=bool)])
            self.doc_len = np.concatenate([self.doc_len, np.zeros(n - len(self.doc_len), dtype=np.float32)])

    def _grow_terms(self, top):
        if top >= len(self.df):
            self.df = np.concatenate([self.df, np.zeros(max(top + 1, 2 * len(self.df)) - len(self.df), np.int64)])

    def add(self, conn, chunk_ids):
        """Make chunks live from their rows in the store (only those of active documents, not yet live)."""
        from .changes import active_rows

        ids = [int(c) for c in chunk_ids if int(c) >= len(self.alive) or not self.alive[int(c)]]
        if not ids:
            return
        lens = active_rows(conn, "SELECT c.id, c.bm25_len FROM chunks c JOIN documents d ON d.id=c.doc_id "
                                 "WHERE d.status='active' AND c.id IN", ids)
        if not lens:
            return
        live = np.array([tuple(r) for r in lens], dtype=np.int64)
        self._grow_chunks(int(live[:, 0].max()))
        self.doc_len[live[:, 0]] = live[:, 1]
        self.alive[live[:, 0]] = True
        self.n_docs += len(live)
        self.total_len += float(live[:, 1].sum())
        post = active_rows(conn, "SELECT p.term_id, t.term, p.chunk_id, p.tf FROM postings p JOIN terms t "
                                 "ON t.id=p.term_id WHERE p.chunk_id IN", live[:, 0].tolist())
        by_term = {}
        for tid, term, cid, tf in post:
            self.term_ids[term] = tid
            by_term.setdefault(tid, ([], []))
            by_term[tid][0].append(cid)
            by_term[tid][1].append(tf)
        if by_term:
            self._grow_terms(max(by_term))
        for tid, (cids, tfs) in by_term.items():
            self._extra.setdefault(tid, []).append((np.array(cids, dtype=np.int64), np.array(tfs, dtype=np.float32)))
            self.df[tid] += len(cids)
            self._n_post += len(cids)
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

    def idf(self, tid):
        """rank-bm25's IDF: log((N - df + 0.5) / (df + 0.5)), and epsilon x the mean IDF where negative."""
        df = float(self.df[tid])
        raw = np.log(self.n_docs - df + 0.5) - np.log(df + 0.5)
        if raw >= 0:
            return float(raw)
        if self._mean_idf is None:  # the mean over the vocabulary: once per change, not per query
            d = self.df[self.df > 0].astype(np.float64)
            self._mean_idf = float((np.log(self.n_docs - d + 0.5) - np.log(d + 0.5)).mean()) if len(d) else 0.0
        return self.epsilon * self._mean_idf

    @property
    def avgdl(self):
        return self.total_len / self.n_docs if self.n_docs else 1.0

    def search(self, query, n, allowed=None):
        """Top-n (chunk ids, scores) for a query string; `allowed` is a boolean mask over chunk ids."""
        scores = np.zeros(len(self.doc_len), dtype=np.float64)
        matched = np.zeros(len(self.doc_len), dtype=bool)  # a term with idf 0 (tiny corpora) still matches
        k1, b, avgdl = self.k1, self.b, self.avgdl
        for term in bm25_tokens(query):
            tid = self.term_ids.get(term)
            if tid is None or tid >= len(self.df) or self.df[tid] <= 0:
                continue
            ids, tf = self._postings(tid)
            live = self.alive[ids]
            ids, tf = ids[live], tf[live].astype(np.float64)
            norm = k1 * (1 - b + b * self.doc_len[ids] / avgdl)
            scores[ids] += self.idf(tid) * tf * (k1 + 1) / (tf + norm)
            matched[ids] = True
        if allowed is not None:
            m = min(len(allowed), len(matched))
            matched[:m] &= allowed[:m]
            matched[m:] = False
        cand = np.flatnonzero(matched)
        if len(cand) > n:
            cand = cand[np.argpartition(-scores[cand], n - 1)[:n]]
        order = np.lexsort((cand, -scores[cand]))
        cand = cand[order]
        return cand.astype(np.int64), scores[cand].astype(np.float32)

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
                     doc_len=self.doc_len, alive=self.alive,
                     terms=np.frombuffer("\n".join(terms).encode("utf-8"), dtype=np.uint8),
                     tids=tids, counts=bounds[:, 1] - bounds[:, 0], ids=self._ids, tf=self._tf)
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
                      arrays["ids"].astype(np.int64), arrays["tf"].astype(np.float32))
        obj.term_ids = dict(zip(terms, arrays["tids"].tolist()))
        return obj, "ok"
