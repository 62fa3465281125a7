"""Indexes: the one owner of a KB's derived indexes in one process (FAISS for dense, BM25 for sparse).

Each index records the change-log sequence number it reflects. `catch_up` replays the log from there to
the newest commit, whoever made it; an index is loaded from its saved file, or rebuilt from the store
(with a notice) only when the file is missing, corrupt or too far behind. Writers never touch an index:
they commit a Change (changes.py), and the next search catches up. Files are saved when enough has changed
since the last save (a small write never rewrites whole files; a reader replays the short tail)."""

import threading

import numpy as np

from . import changes
from .index import BM25, DenseIndex

SAVE_AFTER = 2048  # chunks changed since the last save; or 5% of the index, whichever is more


class Indexes:
    def __init__(self, dense_path, bm25_path, config, identity, dim, notify, readonly=False):
        """`identity()`: what a saved file must match ({model_id, kb_created}); `dim()`: the vector size."""
        self.dense_path, self.bm25_path = dense_path, bm25_path
        self.config, self._identity, self._dim, self._notify = config, identity, dim, notify
        self.dense, self.bm25 = None, None
        self.readonly = readonly  # a read-only KB: indexes live in memory only
        self.lock = threading.RLock()  # replays and searches of one index never overlap

    # -- catching up

    def catch_up(self, conn, dense=True, bm25=True):
        """Bring the asked-for indexes to the newest committed change; returns its sequence number."""
        with self.lock:
            head = changes.head(conn)
            if dense and (self.dense is None or self.dense.seq != head):
                self.dense = self._dense_at(conn, head)
            if bm25 and (self.bm25 is None or self.bm25.seq != head):
                self.bm25 = self._bm25_at(conn, head)
            if self.bm25 is not None:  # k1 and b apply at query time: a changed setting needs no rebuild
                self.bm25.k1, self.bm25.b = float(self.config["bm25"]["k1"]), float(self.config["bm25"]["b"])
            return head

    def _behind(self, conn, seq, head, count):
        """None when replaying (seq, head] is cheaper than a rebuild, else why not."""
        if seq < 0 or seq > head:
            return "from another history"
        n, touched, reset = changes.pending(conn, seq, head)
        if reset:
            return "reset by reindex"
        if touched > max(50_000, count):
            return f"{touched} chunks behind"
        return None

    def _dense_at(self, conn, head):
        d = self.dense
        if d is None:
            d, why = DenseIndex.load(self.dense_path, self._dense_expect())
            if d is None and why != "missing":  # a missing file is normal (new KB, cache removed)
                self._notify(f"dense index {why}; rebuilding from stored embeddings")
        if d is not None:
            why = self._behind(conn, d.seq, head, d.count)
            if why is None:
                if self._replay_dense(conn, d, head):
                    return d
                why = "cannot remove from an HNSW index"
            if why != "reset by reindex":
                self._notify(f"dense index {why}; rebuilding from stored embeddings")
        d = self._build_dense(conn)
        self._save(d, self.dense_path, self._dense_expect())
        return d

    def _replay_dense(self, conn, d, head):
        conn.execute("BEGIN")  # the log and the rows it points to, in one snapshot
        try:
            rows = changes.since(conn, d.seq, head)
            for seq, added, removed, _, _ in rows:
                if len(removed):
                    if not d.can_remove:
                        return False
                    d.remove(removed)
                if len(added):
                    got = changes.active_rows(conn, "SELECT c.id, c.embedding FROM chunks c JOIN documents d "
                                                    "ON d.id=c.doc_id WHERE d.status='active' AND c.id IN", added)
                    if got:
                        vecs = np.frombuffer(b"".join(r[1] for r in got), dtype=np.float32).reshape(len(got), -1)
                        d.add([r[0] for r in got], vecs)
                d.seq = seq
            d.seq = head
            return True
        finally:
            conn.execute("COMMIT")

    def _build_dense(self, conn):
        conn.execute("BEGIN")
        try:
            seq = changes.head(conn)
            ids, vecs = [], []
            for cid, blob in conn.execute("SELECT c.id, c.embedding FROM chunks c JOIN documents d ON d.id=c.doc_id "
                                          "WHERE d.status='active' ORDER BY c.id"):
                ids.append(cid)
                vecs.append(blob)
        finally:
            conn.execute("COMMIT")
        dim = len(vecs[0]) // 4 if vecs else self._dim()
        cfg = self.config["dense"]
        d = DenseIndex(dim, cfg["index"], cfg["hnsw_m"])
        if ids:
            d.add(np.asarray(ids, dtype=np.int64),
                  np.frombuffer(b"".join(vecs), dtype=np.float32).reshape(len(ids), dim))
        d.seq = seq
        return d

    def _bm25_at(self, conn, head):
        b = self.config["bm25"]
        e = self.bm25
        if e is None:
            e, why = BM25.load(self.bm25_path, self._identity(), b["k1"], b["b"])
            if e is None and why != "missing":
                self._notify(f"BM25 arrays {why}; rebuilding from the postings")
        if e is not None:
            if self._behind(conn, e.seq, head, e.n_docs) is None:
                conn.execute("BEGIN")
                try:
                    for seq, added, removed, post, _ in changes.since(conn, e.seq, head):
                        e.remove(removed, post)
                        e.add(conn, added)
                    e.seq = head
                finally:
                    conn.execute("COMMIT")
                return e
        e = BM25(conn, b["k1"], b["b"])
        self._save(e, self.bm25_path, self._identity())
        return e

    # -- files

    def _dense_expect(self):
        return dict(self._identity(), kind=self.config["dense"]["index"])

    def _save(self, index, path, manifest):
        if self.readonly:
            return
        try:
            index.save(path, manifest)
            index.saved_seq = index.seq
        except OSError as e:
            self._notify(f"cannot save {path} ({e.strerror}); the index is kept in memory")

    def save_if_due(self, conn):
        """Save each index whose file is far behind the log (catching it up first): big writes leave files
        that the next process can load and replay cheaply; small writes rewrite nothing."""
        head = changes.head(conn)
        for name, path in (("dense", self.dense_path), ("bm25", self.bm25_path)):
            saved = _saved_seq(path)
            n, touched, reset = changes.pending(conn, saved, head) if saved >= 0 else (1, 1 << 40, True)
            if not n:
                continue
            index = getattr(self, name)
            size = (index.count if name == "dense" else index.n_docs) if index is not None else 0
            if reset or touched >= max(SAVE_AFTER, size // 20):
                with self.lock:
                    self.catch_up(conn, dense=name == "dense", bm25=name == "bm25")
                    index = getattr(self, name)
                    if getattr(index, "saved_seq", None) != index.seq:
                        self._save(index, path, self._dense_expect() if name == "dense" else self._identity())

    def reset(self):
        """Forget the in-memory indexes (after a reindex): the next catch-up loads or rebuilds them."""
        with self.lock:
            self.dense, self.bm25 = None, None


def _saved_seq(path):
    import json

    try:
        with open(path + ".manifest.json", encoding="utf-8") as f:
            return int(json.load(f).get("seq", -1))
    except (OSError, ValueError, TypeError):
        return -1
