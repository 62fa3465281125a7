"""Indexes: the one owner of a KB's derived indexes in one process (FAISS for dense, BM25 for sparse, and
the kind of each live chunk that filters and the unit cap read).

Each index records the change-log sequence number it reflects. `catch_up` reads the log's tail and the rows
it points to once, in one snapshot, and applies each change to every index behind it, whoever made the
change. An index is loaded from its saved file, or rebuilt from the store (with a notice) only when the file
is missing, corrupt or too far behind. Writers never touch an index: they commit a Change (store/changes.py), and
the next search catches up. Files are saved when enough has changed since the last save (a small write
never rewrites whole files; a reader replays the short tail). Every read of the records goes through a
`store.Records` the caller hands in: no SQL here."""

import json
import os
import threading

import numpy as np

from .filters import KINDS
from .index import BM25, DenseIndex
from .text import bm25_tokens, index_text

SAVE_AFTER = 2048  # chunks changed since the last save; or 5% of the index, whichever is more
REPLAY_LIMIT = 50_000  # chunks behind (or the index's size, if larger) beyond which a rebuild is cheaper


BACKENDS = {"embedded": ("writeback_rag.indexes", "Indexes"), "milvus": ("writeback_rag.milvus", "MilvusIndexes")}


def register_backend(name, module, cls):
    """A place for the derived indexes: a subclass of Indexes, importable as module.cls (loaded on use)."""
    BACKENDS[name] = (module, cls)


def backend(name):
    """The Indexes class of a backend (index.backend)."""
    import importlib

    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)


class Indexes:
    """Every derived index of one KB in one process, and the rule that keeps them at the log's head."""

    def __init__(self, dense_path, bm25_path, config, identity, dim, notify, readonly=False):
        """`identity()`: what a saved file must match ({model_id, kb_created}); `dim()`: the vector size."""
        self.dense_path, self.bm25_path = dense_path, bm25_path
        self.config, self._identity, self._dim, self._notify = config, identity, dim, notify
        self.dense, self.bm25, self.kinds = None, None, None
        self.readonly = readonly  # a read-only KB: indexes live in memory only
        self.lock = threading.RLock()  # replays and searches of one index never overlap
        self._records = None  # (document predicates, log head) -> the chunk ids they allow

    # -- catching up

    def catch_up(self, records, dense=True, bm25=True, kinds=True):
        """Bring the asked-for indexes (and the chunk kinds, which searches need) to the newest committed
        change; returns it."""
        with self.lock:
            head = records.head()
            names = ["kinds"] * kinds + ["dense"] * dense + ["bm25"] * bm25
            if any(getattr(self, n) is None or getattr(self, n).seq != head for n in names):
                self._open(records, names, head)
                behind = [n for n in names if getattr(self, n).seq != head]
                if behind:
                    self._replay(records, behind, head)
            if bm25 and self.bm25 is not None:  # k1 and b apply at query time: a changed setting needs no rebuild
                self.bm25.k1, self.bm25.b = float(self.config["bm25"]["k1"]), float(self.config["bm25"]["b"])
            return head

    def refresh(self, records):
        """After this process commits: the indexes it has loaded apply the change now (none is loaded by
        a write alone), so the first search after a write costs what any search costs."""
        with self.lock:
            if self.dense is not None or self.bm25 is not None:
                self.catch_up(records, dense=self.dense is not None, bm25=self.bm25 is not None)

    def _open(self, records, names, head):
        """Load what is not in memory; rebuild what cannot catch up by replaying (with a notice why)."""
        behind = {}  # seq -> pending(): the indexes are usually at one sequence, so the log is asked once
        for name in names:
            index = getattr(self, name)
            if index is None:
                index, why = self._load(name)
                if index is None and why != "missing":  # a missing file is normal (new KB, cache removed)
                    self._notify(f"{self._label(name)} {why}; rebuilding from the store")
            if index is not None:
                why = self._behind(records, index, head, behind)
                if why is None:
                    setattr(self, name, index)
                    continue
                if why != "reset by reindex":
                    self._notify(f"{self._label(name)} {why}; rebuilding from the store")
            setattr(self, name, self._build(records, name))

    def _behind(self, records, index, head, memo):
        """None when replaying (index.seq, head] is cheaper than a rebuild, else why not."""
        seq = index.seq
        if seq < 0 or seq > head:
            return "from another history"
        if seq not in memo:
            memo[seq] = records.pending(seq, head)
        n, touched, reset = memo[seq]
        if reset:
            return "reset by reindex"
        if touched > max(REPLAY_LIMIT, _size(index)):
            return f"{touched} chunks behind"
        if isinstance(index, DenseIndex) and not index.can_remove and n and records.removes(seq, head):
            return "an HNSW graph cannot remove vectors"
        return None

    def _replay(self, records, names, head):
        """The log's tail after the oldest of `names`, and the rows its added chunks point to, read in one
        snapshot; each change applied, in order, to every index that has not applied it."""
        start = min(getattr(self, n).seq for n in names)
        with records.snapshot():
            tail = records.changes(start, head)
            added = sorted({int(c) for entry in tail for c in entry[1]})
            fields = ["kind"] + ["text", "title"] * ("bm25" in names) + ["vector"] * ("dense" in names)
            rows = {r[0]: r for r in records.chunks(fields, added)}  # only what the indexes behind need
            at = {f: i + 1 for i, f in enumerate(fields)}
            for seq, add, removed, postings, _ in tail:
                live = [rows[c] for c in add.tolist() if c in rows]  # chunks removed since are skipped
                for name in names:
                    index = getattr(self, name)
                    if index.seq >= seq:
                        continue
                    if name == "kinds":
                        index.remove(removed)
                        index.add(live)
                    elif name == "bm25":
                        index.remove(removed, postings)
                        index.add(records, [(r[0], r[at["text"]], r[at["title"]]) for r in live])
                    else:
                        index.remove(removed)
                        if live:
                            v = at["vector"]
                            index.add([r[0] for r in live], np.frombuffer(b"".join(r[v] for r in live),
                                                                          dtype=np.float32).reshape(len(live), -1))
                    index.seq = seq
            for name in names:
                getattr(self, name).seq = head

    def _build(self, records, name):
        """One index from the store, in one snapshot at the head it reads; saved when it has a file."""
        with records.snapshot():
            seq = records.head()
            if name == "kinds":
                index = ChunkKinds()
                index.add(records.chunks(["kind"]))
            elif name == "bm25":
                b = self.config["bm25"]
                index = BM25(None, b["k1"], b["b"])
                index.build(records)
            else:
                index = self._build_dense(records)
        index.seq = seq
        if name == "bm25":
            self._save(index, self.bm25_path, self._identity())
        elif name == "dense" and self.saves_dense:
            self._save(index, self.dense_path, self._dense_expect())
        return index

    def _build_dense(self, records):
        rows = records.chunks(["vector"])
        dim = len(rows[0][1]) // 4 if rows else self._dim()
        cfg = self.config["dense"]
        d = DenseIndex(dim, cfg["index"], cfg["hnsw_m"])
        if rows:
            d.add(np.asarray([r[0] for r in rows], dtype=np.int64),
                  np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim))
        return d

    def _load(self, name):
        if name == "kinds":
            return None, "missing"
        if name == "bm25":
            b = self.config["bm25"]
            return BM25.load(self.bm25_path, self._identity(), b["k1"], b["b"])
        if not self.saves_dense:
            self._drop_file(self.dense_path)
            return None, "missing"
        return DenseIndex.load(self.dense_path, self._dense_expect())

    @staticmethod
    def _label(name):
        return {"dense": "dense index", "bm25": "BM25 arrays", "kinds": "chunk kinds"}[name]

    # -- files

    @property
    def saves_dense(self):
        """A flat index is nothing but the stored vectors: it is built from them on open (about 0.3 s per
        100k chunks), so they are kept once. An HNSW graph costs minutes to build: its file earns its place."""
        return self.config["dense"]["index"] != "flat"

    def _drop_file(self, path):
        """A flat index's file left by an older version: the vectors are in the store."""
        if self.readonly:
            return
        for p in (path, path + ".manifest.json"):
            try:
                os.remove(p)
            except OSError:
                pass

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

    def save_if_due(self, records):
        """Save each index whose file is far behind the log (catching it up first): big writes leave files
        that the next process can load and replay cheaply; small writes rewrite nothing."""
        head = records.head()
        for name, path in (("dense", self.dense_path), ("bm25", self.bm25_path)):
            if name == "dense" and not self.saves_dense:
                continue
            saved = _saved_seq(path)
            n, touched, reset = records.pending(saved, head) if saved >= 0 else (1, 1 << 40, True)
            if not n:
                continue
            index = getattr(self, name)
            if reset or touched >= max(SAVE_AFTER, _size(index) // 20 if index is not None else 0):
                with self.lock:
                    self.catch_up(records, dense=name == "dense", bm25=name == "bm25", kinds=False)
                    index = getattr(self, name)
                    if getattr(index, "saved_seq", None) != index.seq:
                        self._save(index, path, self._dense_expect() if name == "dense" else self._identity())

    def close(self):
        """Let go of what the indexes hold outside this process (nothing, for local ones)."""

    def drop(self, records):
        """Remove the saved files (after the KB moved its indexes to another backend)."""
        with self.lock:
            self.dense = self.bm25 = None
            for path in (self.dense_path, self.bm25_path):
                self._drop_file(path)

    def reset(self):
        """Forget the in-memory indexes (after a reindex): the next catch-up loads or rebuilds them."""
        with self.lock:
            self.dense, self.bm25, self.kinds = None, None, None

    # -- searching (what kb.search asks of any backend)

    def candidates(self, records, query, qvec, n, where, sparse=True, dense=True):
        """Top-n (chunk ids, scores) per retriever within the Filter `where`, evaluated once for both:
        (BM25 ids, scores) or None, (dense ids, cosines) or None."""
        with self.lock:  # a replay in another thread never runs under a search
            mask = self.mask(records, where)
            return (self.bm25.search(query, n, mask) if sparse else None,
                    self.dense.search(qvec, n, mask) if dense else None)

    def scores(self, records, query, qvec, n, where, sparse=True, dense=True):
        """candidates() as ({chunk id: BM25 score}, {chunk id: cosine}); a retriever not asked for gives {}."""
        bm, dn = self.candidates(records, query, qvec, n, where, sparse=sparse, dense=dense)
        return ({} if bm is None else dict(zip(bm[0].tolist(), bm[1].tolist())),
                {} if dn is None else dict(zip(dn[0].tolist(), dn[1].tolist())))

    # -- checking

    def verify(self, records, sample=200, seed=0):
        """Every index against the records: (problems, notes, counts). The saved files first, as found; then
        this process's indexes, after replaying the log (the replay itself is under test)."""
        problems, notes = [], []
        with self.lock:
            saved, why = DenseIndex.load(self.dense_path, self._dense_expect()) \
                if self.saves_dense else (None, "missing")
            b = self.config["bm25"]
            e2, why2 = BM25.load(self.bm25_path, self._identity(), b["k1"], b["b"])
            gen, active = self._active_at_head(records)
            repair = "repair with: reindex (CLI: wbrag reindex)"
            counts = {"generation": gen, "active_chunks": int(len(active))}
            if saved is None and why != "missing":
                problems.append(f"dense index file: {why}; it is rebuilt from the stored embeddings on next use")
            elif saved is not None and saved.seq != gen:
                notes.append(f"dense index file is at change {saved.seq}, the KB at {gen}: the tail is replayed on open")
            for label, dense in (("in memory", self.dense), ("file", saved if saved is not None and
                                                                       saved.seq == gen else None)):
                if dense is None:
                    continue
                problems += self._check_dense(records, dense, active, label, sample, seed, repair)
                counts["dense_vectors" if label == "in memory" else "dense_file_vectors"] = int(dense.count)
            counts["indexed_chunks"] = counts["dense_vectors"]
            engine = self.bm25
            alive = np.flatnonzero(engine.alive)
            counts["bm25_chunks"] = int(engine.n_docs)
            if engine.n_docs != len(active) or not np.array_equal(alive, active):
                problems.append(f"BM25 engine at change {engine.seq} covers {engine.n_docs} chunks, not the "
                                f"{len(active)} active ones; " + repair)
            if e2 is None and why2 != "missing":
                problems.append(f"BM25 arrays file: {why2}; it is rebuilt from the chunks on next use")
            elif e2 is not None and e2.seq == gen and not np.array_equal(np.flatnonzero(e2.alive), active):
                problems.append(f"BM25 arrays file claims change {gen} but covers other chunks; " + repair)
            problems += self._check_terms(records, engine, active, sample, seed, repair)
        return problems, notes, counts

    def _active_at_head(self, records):
        """(sequence, active chunk ids) in one snapshot at the sequence the indexes reached."""
        for _ in range(5):
            self.catch_up(records)
            with records.snapshot():
                gen = records.head()
                active = np.array([r[0] for r in records.chunks([])], dtype=np.int64)
            if gen == self.dense.seq == self.bm25.seq:
                break
        return gen, active

    @staticmethod
    def _check_terms(records, engine, active, sample, seed, repair):
        """A sample of chunks: the engine's lengths are those of their text; a sample of terms: the stored
        document frequencies (active sources) are what the engine holds."""
        with records.snapshot():  # the records at the change the engine reached (or no verdict)
            if records.head() != engine.seq:
                return []
            return Indexes._check_terms_at(records, engine, active, sample, seed, repair)

    @staticmethod
    def _check_terms_at(records, engine, active, sample, seed, repair):
        out = []
        rng = np.random.default_rng(seed)
        some = rng.choice(active, size=min(sample, len(active)), replace=False) if len(active) else active
        # read whatever the chunks' status (as the engine's snapshot saw them), not only the live ones
        bad = [cid for cid, (title, text) in records.passages(some.tolist()).items() if cid >= len(engine.doc_len)
               or engine.doc_len[cid] != len(bm25_tokens(index_text(title, text)))]
        if bad:
            out.append(f"BM25 engine: {len(bad)} of {len(rows)} sampled chunks have other lengths than their "
                       f"text (e.g. {bad[:5]}); " + repair)
        sources = np.array([r[0] for r in records.chunks([], kind="source")], dtype=np.int64)
        is_source = np.zeros(len(engine.alive), dtype=bool)
        is_source[sources[sources < len(is_source)]] = True
        terms = records.sample_terms(sample)
        wrong = []
        for tid, term, df in terms:
            ids, _ = engine._postings(tid) if tid < len(engine.df) else (np.zeros(0, np.int64), None)
            held = int((engine.alive[ids] & is_source[ids]).sum())
            if held != df:
                wrong.append(f"{term!r} {df} stored, {held} indexed")
        if wrong:
            out.append(f"term statistics: {len(wrong)} of {len(terms)} sampled terms differ ({'; '.join(wrong[:3])}); "
                       + repair)
        return out

    @staticmethod
    def _check_dense(records, dense, active, label, sample, seed, repair):
        import faiss

        out = []
        ids = faiss.vector_to_array(dense.index.id_map).astype(np.int64)
        missing, extra = np.setdiff1d(active, ids), np.setdiff1d(ids, active)
        if len(missing) or len(extra) or len(ids) != len(np.unique(ids)):
            out.append(f"dense index ({label}) at change {dense.seq} lacks {len(missing)} active chunks and holds "
                       f"{len(extra) + len(ids) - len(np.unique(ids))} others (e.g. "
                       f"{(missing.tolist() + extra.tolist())[:5]}); " + repair)
        rng = np.random.default_rng(seed)
        some = rng.choice(active, size=min(sample, len(active)), replace=False) if len(active) else active
        bad = 0
        for cid in np.intersect1d(some, ids).tolist():
            if not np.allclose(dense.index.reconstruct(cid), records.vector(cid), atol=1e-5):
                bad += 1
        if bad:
            out.append(f"dense index ({label}): {bad} of {len(some)} sampled vectors differ from the stored "
                       "embeddings; " + repair)
        return out


    # -- filters

    def record_ids(self, records, where):
        """Live chunk ids whose documents pass `where`'s document predicates. One query per search: the
        answer is kept for the log's head, so a search's parts (sources, units) and its deeper passes share it."""
        key = (where.doc_globs, where.source_globs, where.meta, records.head())
        memo = self._records
        if memo is None or memo[0] != key:
            ids = records.ids(where)
            memo = self._records = (key, ids)
        return memo[1]

    def mask(self, records, where):
        """A Filter as a boolean mask over chunk ids for the local engines, or None when it lets every live
        chunk through. Kinds come from this process's own table; document predicates from the store."""
        if where.kinds >= set(KINDS) and not where.on_records:
            return None
        m = self.kinds.mask(where.kinds)
        if where.on_records:
            ids = self.record_ids(records, where)
            chosen = np.zeros(len(m), dtype=bool)
            chosen[ids[ids < len(m)]] = True
            m = m & chosen
        return m


class ChunkKinds:
    """Per chunk id, the kind of a live chunk (0: not live): what a filter by kind and the unit cap are
    evaluated against, in memory, kept at the log's head like the indexes."""

    CODES = {"source": 1, "unit": 2}

    def __init__(self):
        self.codes = np.zeros(0, dtype=np.int8)
        self.counts = {k: 0 for k in self.CODES}
        self.seq = -1
        self._masks = {}  # kinds -> boolean mask over chunk ids
        self._units = set()  # the live unit chunks' ids: is_unit is asked for every candidate of a search

    def add(self, rows):
        """(chunk id, kind, ...) rows of live chunks."""
        if not rows:
            return
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        if ids.max() >= len(self.codes):
            grown = np.zeros(max(int(ids.max()) + 1, 2 * len(self.codes)), dtype=np.int8)
            grown[:len(self.codes)] = self.codes
            self.codes = grown
        self.remove(ids)  # a chunk counted once, whatever came before
        codes = np.array([self.CODES.get(r[1], 0) for r in rows], dtype=np.int8)
        self.codes[ids] = codes
        for kind, code in self.CODES.items():
            self.counts[kind] += int((codes == code).sum())
        self._units.update(ids[codes == self.CODES["unit"]].tolist())
        self._masks = {}

    def remove(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[ids < len(self.codes)]
        if len(ids):
            for kind, code in self.CODES.items():
                self.counts[kind] -= int((self.codes[ids] == code).sum())
            self.codes[ids] = 0
            self._units.difference_update(ids.tolist())
            self._masks = {}

    def mask(self, kinds):
        key = frozenset(kinds)
        if key not in self._masks:
            self._masks[key] = np.isin(self.codes, [self.CODES[k] for k in key])
        return self._masks[key]

    def is_unit(self, chunk_id):
        return chunk_id in self._units


def _size(index):
    return index.count if isinstance(index, DenseIndex) else index.n_docs if isinstance(index, BM25) \
        else int(len(index.codes))


def _saved_seq(path):
    try:
        with open(path + ".manifest.json", encoding="utf-8") as f:
            return int(json.load(f).get("seq", -1))
    except (OSError, ValueError, TypeError):
        return -1
