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
                        crc32=zlib.crc32(data), bytes=len(data))
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


def delete_postings(conn, chunk_ids):
    conn.executemany("DELETE FROM postings WHERE chunk_id=?", [(int(c),) for c in chunk_ids])


def load_term_ids(conn):
    return {term: tid for tid, term in conn.execute("SELECT id, term FROM terms")}


class BM25:
    """Okapi BM25 scored exactly like rank-bm25's BM25Okapi, over an in-memory copy of the postings.

    SQLite holds the postings in the same transactions as the documents, so the engine can never
    disagree with the store after a crash; this class only caches them as numpy arrays per term."""

    FORMAT = 1  # of the saved arrays; bump when save() changes

    def __init__(self, conn, k1=1.2, b=0.75, epsilon=0.25):
        self.k1, self.b, self.epsilon = float(k1), float(b), epsilon
        lens = np.array([tuple(r) for r in conn.execute(
            "SELECT c.id, c.bm25_len FROM chunks c JOIN documents d ON d.id=c.doc_id WHERE d.status='active'")],
            dtype=np.int64).reshape(-1, 2)
        self.n_docs = len(lens)
        self.doc_len = np.zeros(int(lens[:, 0].max()) + 1 if self.n_docs else 1, dtype=np.float32)
        self.doc_len[lens[:, 0]] = lens[:, 1]
        self.avgdl = float(self.doc_len.sum() / self.n_docs) if self.n_docs else 1.0
        # one row per term with its postings concatenated: far fewer Python objects than a row per posting
        rows = conn.execute("SELECT t.term, COUNT(*), group_concat(p.chunk_id), group_concat(p.tf) FROM postings p "
                            "JOIN terms t ON t.id=p.term_id GROUP BY p.term_id").fetchall()
        self.idf, self.contrib = {}, {}
        if rows:
            terms = [r[0] for r in rows]
            df = np.array([r[1] for r in rows], dtype=np.int64)
            ids = np.array(",".join(r[2] for r in rows).split(","), dtype=np.int64)
            tf = np.array(",".join(r[3] for r in rows).split(","), dtype=np.float32)
            idf = np.log(self.n_docs - df + 0.5) - np.log(df + 0.5)
            idf = np.where(idf >= 0, idf, self.epsilon * float(idf.mean()))  # rank-bm25's epsilon floor
            norm = self.k1 * (1 - self.b + self.b * self.doc_len[ids] / self.avgdl)
            # per-term BM25 contributions precomputed once: query time is a few numpy adds
            c = (np.repeat(idf, df) * tf * (self.k1 + 1) / (tf + norm)).astype(np.float32)
            self._set_terms(terms, idf, df, ids, c)

    def _set_terms(self, terms, idf, df, ids, contrib):
        ends = np.cumsum(df).tolist()
        starts = [0] + ends[:-1]
        self.idf = dict(zip(terms, np.asarray(idf).tolist()))
        self.contrib = {t: (ids[a:b], contrib[a:b]) for t, a, b in zip(terms, starts, ends)}

    def save(self, path, manifest):
        """Persist the arrays (temp file + rename, then the manifest), so a new process skips the SQL load."""
        terms = list(self.contrib)
        entries = [self.contrib[t] for t in terms]
        manifest = dict(manifest, **self._params(), package_version=__version__, n_docs=self.n_docs, n_terms=len(terms))
        tmp = _tmp_name(path)
        with open(tmp, "wb") as f:
            np.savez(f, manifest=np.frombuffer(json.dumps(manifest, sort_keys=True).encode("utf-8"), dtype=np.uint8),
                     doc_len=self.doc_len,
                     terms=np.frombuffer("\n".join(terms).encode("utf-8"), dtype=np.uint8),
                     idf=np.array([self.idf[t] for t in terms], dtype=np.float64),
                     df=np.array([len(e[0]) for e in entries], dtype=np.int64),
                     ids=np.concatenate([e[0] for e in entries]) if entries else np.zeros(0, np.int64),
                     contrib=np.concatenate([e[1] for e in entries]) if entries else np.zeros(0, np.float32))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        write_json_atomic(path + ".manifest.json", manifest)

    def _params(self):
        return {"format": self.FORMAT, "k1": self.k1, "b": self.b, "epsilon": self.epsilon}

    @classmethod
    def load(cls, path, expect, k1=1.2, b=0.75, epsilon=0.25):
        """The saved engine if its manifest matches `expect` (generation) and these parameters, else (None, why)."""
        manifest, why = read_manifest(path, dict(expect, format=cls.FORMAT, k1=float(k1), b=float(b), epsilon=epsilon,
                                                 package_version=__version__))
        if manifest is None:
            return None, why
        obj = cls.__new__(cls)
        obj.k1, obj.b, obj.epsilon = float(k1), float(b), epsilon
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in ("manifest", "doc_len", "terms", "idf", "df", "ids", "contrib")}
            inner = json.loads(arrays["manifest"].tobytes().decode("utf-8"))
        except Exception:
            return None, "corrupt file"
        if inner != manifest:  # two processes saving different generations at once: file and manifest differ
            return None, "file and manifest from different saves"
        terms = arrays["terms"].tobytes().decode("utf-8").split("\n") if len(arrays["terms"]) else []
        if len(terms) != manifest.get("n_terms") or len(arrays["df"]) != len(terms) \
                or int(arrays["df"].sum()) != len(arrays["ids"]) or len(arrays["ids"]) != len(arrays["contrib"]):
            return None, "corrupt file (sizes differ from the manifest)"
        obj.doc_len, obj.n_docs = arrays["doc_len"], int(manifest["n_docs"])
        obj.avgdl = float(obj.doc_len.sum() / obj.n_docs) if obj.n_docs else 1.0
        obj.idf, obj.contrib = {}, {}
        if terms:
            obj._set_terms(terms, arrays["idf"], arrays["df"], arrays["ids"], arrays["contrib"])
        return obj, "ok"

    def search(self, query, n, allowed=None):
        """Top-n (chunk ids, scores) for a query string; `allowed` is a boolean mask over chunk ids."""
        scores = np.zeros(len(self.doc_len), dtype=np.float32)
        matched = np.zeros(len(self.doc_len), dtype=bool)  # a term with idf 0 (tiny corpora) still matches
        for term in bm25_tokens(query):
            entry = self.contrib.get(term)
            if entry is not None:
                scores[entry[0]] += entry[1]
                matched[entry[0]] = True
        if allowed is not None:
            m = min(len(allowed), len(matched))
            matched[:m] &= allowed[:m]
            matched[m:] = False
        cand = np.flatnonzero(matched)
        if len(cand) > n:
            cand = cand[np.argpartition(-scores[cand], n - 1)[:n]]
        order = np.lexsort((cand, -scores[cand]))
        cand = cand[order]
        return cand.astype(np.int64), scores[cand]
