"""KnowledgeBase: the public API that the CLI and other apps use."""

import contextlib
import copy
import json
import os
import sqlite3
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

from . import config as cfgmod
from . import ranking, store
from .backends import CachedEmbedder, embedder_model_id, get_embedder
from .filters import Filter
from .errors import EmbedderMismatch, InputError, NotAKnowledgeBase, StorageError, storage_error, translating
from .store import documents, querylog
from .store import units as unit_records
from .store.changes import head
from .corpus import Corpus
from .indexes import backend as index_backend
from .loaders import IngestReport
from .text import normalize_id
from .tuning import FUSIONS, UNTUNED, Active, fuse, units_off

DB_NAME, DENSE_NAME, BM25_NAME, CONFIG_NAME = "kb.sqlite", "dense.faiss", "bm25.npz", "config.toml"
__all__ = ["KnowledgeBase", "Hit", "SearchResult", "IngestReport", "fuse"]

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


_storage_guard = translating(lambda kb, e: storage_error(e, kb.path)
                             if isinstance(e, (sqlite3.DatabaseError, OSError)) else None)
_storage_guard.__doc__ = "sqlite3 and OS failures below a public method become one StorageError saying what to do."


# a hit's chunk and its document's header in one statement (the header from its covering index: a
# document's row also holds its whole text)
class KnowledgeBase:
    """A folder: kb.sqlite (truth), dense.faiss and bm25.npz with manifests (derived), config.toml."""

    ROW_CACHE = 4096  # hits' rows kept between searches (_hits)

    def __init__(self, path, cfg, embedder=None, notify=None, readonly=False):
        self.path = os.path.abspath(path)
        self.readonly = readonly
        self.config = cfg
        self.db_path = os.path.join(self.path, DB_NAME)
        self.dense_path = os.path.join(self.path, DENSE_NAME)
        self.bm25_path = os.path.join(self.path, BM25_NAME)
        self._conns = store.Connections(self.db_path, readonly)
        self._at_head = (None, frozenset())  # see _units_off
        self._rows = (None, {})  # see _hits
        self._embedder_lock = threading.Lock()
        self._llm_lock = threading.Lock()  # its own: loading the LLM never waits for (or blocks) a writer
        self._embedder = embedder
        self._notify = notify or _stderr
        self._indexes = index_backend(cfg["index"]["backend"])(
            self.dense_path, self.bm25_path, cfg, self._identity, self._dim, self._notify, readonly)
        self._llm = None
        self._tuning = Active()
        self.corpus = Corpus(lambda: self.conn, self._indexes, cfg, lambda: self.embedder, _units_go_stale)

    # ---- lifecycle ---------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, embedder: str | dict | None = None, config: dict | None = None,
               notify: Callable[[str], Any] | None = None) -> "KnowledgeBase":
        """Make a new KB folder; `embedder` is a registered name, model name or path (default: minilm);
        `config` overrides settings ({section: {key: value}}); `notify` receives one-line notices."""
        path = os.path.abspath(path)
        if os.path.exists(path) and not os.path.isdir(path):
            raise InputError(f"{path}: is a file, not a folder; pick a new or empty folder for the knowledge base")
        if os.path.exists(os.path.join(path, DB_NAME)):
            raise InputError(f"{path}: a knowledge base already exists here; use it or pick another folder")
        overrides = {s: dict(v) if isinstance(v, dict) else v for s, v in (config or {}).items()}
        if embedder is not None:
            overrides.setdefault("embedder", {}).update({"name": embedder} if isinstance(embedder, str)
                                                        else dict(embedder))
        cfg = cfgmod.validate(overrides)
        emb = get_embedder(cfg["embedder"])  # an embedder that cannot load is refused before anything is written
        # `auto` is decided once, here, on this CPU: the KB keeps the precision its vectors were made in
        cfg["embedder"]["precision"] = getattr(emb, "precision", "fp32")
        try:
            os.makedirs(path, exist_ok=True)
            cfgmod.dump(cfg, os.path.join(path, CONFIG_NAME))
            conn = store.connect(os.path.join(path, DB_NAME))
            store.migrate(conn)
            with store.transaction(conn):
                store.set_meta(conn, "model_id", embedder_model_id(cfg["embedder"]))
                store.set_meta(conn, "dim", emb.dim)
                store.set_meta(conn, "generation", 0)
                store.set_meta(conn, "created", time.time())
            conn.close()
        except (OSError, sqlite3.Error) as e:
            raise InputError(f"{path}: cannot create the knowledge base here "
                             f"({getattr(e, 'strerror', None) or e}); pick a writable folder") from None
        kb = cls.open(path, notify=notify)
        kb._embedder = emb
        return kb

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, embedder: str | dict | None = None,
                       config: dict | None = None, notify: Callable[[str], Any] | None = None) -> "KnowledgeBase":
        """Open the KB at `path`, or create it there (with `embedder` and `config`) when there is none."""
        if os.path.isfile(os.path.join(os.path.abspath(path), DB_NAME)):
            return cls.open(path, embedder=embedder if isinstance(embedder, str) else None, notify=notify)
        return cls.create(path, embedder=embedder, config=config, notify=notify)

    @classmethod
    def open(cls, path: str | os.PathLike, embedder: str | None = None, notify: Callable[[str], Any] | None = None,
             readonly: bool | None = None) -> "KnowledgeBase":
        """Open an existing KB; refuses one built with another embedder than `embedder`/config asks for.

        `readonly` (default: when the folder or database cannot be written) opens it for searches without
        logging, stats, check and the query log: nothing is written, indexes are replayed in memory only."""
        path = os.path.abspath(path)
        db = os.path.join(path, DB_NAME)
        if not os.path.isfile(db):
            raise NotAKnowledgeBase(f"{path}: not a writeback-rag knowledge base (no {DB_NAME})",
                                    cli=f"create one with: wbrag init --kb {path}",
                                    api="create one with KnowledgeBase.create(path)")
        if readonly is None:
            readonly = not (os.access(path, os.W_OK) and os.access(db, os.W_OK))
        try:  # one read-only look first: nothing is written to a file that is not a KB
            conn = store.connect(db, readonly=True)
            try:
                version = store.version(conn)
                is_kb = version > 0 and store.has_meta_table(conn)
                built_with = store.get_meta(conn, "model_id") if is_kb else None
            finally:
                conn.close()
            if not is_kb:  # empty (0 bytes) or another program's database: refused before anything is written
                raise NotAKnowledgeBase(f"{db}: not a writeback-rag database (empty, or another program's)",
                                        cli="restore kb.sqlite from a backup, or create a new KB elsewhere with "
                                            "wbrag init", api="restore kb.sqlite from a backup")
            if version < len(store.MIGRATIONS):
                if readonly:
                    raise NotAKnowledgeBase(f"{path}: this KB needs upgrading, which writes to it; it is read-only",
                                            cli="open it once where it can be written (any wbrag command)",
                                            api="open it once with readonly=False where it can be written")
                conn = store.connect(db)
                try:
                    store.migrate(conn)
                finally:
                    conn.close()
        except (sqlite3.DatabaseError, OSError) as e:
            raise storage_error(e, path) from None
        cpath = os.path.join(path, CONFIG_NAME)
        if os.path.exists(cpath):
            cfg = cfgmod.load(cpath)
        else:  # settings lost, data intact: defaults, with the embedder the KB was built with
            base, _, precision = (built_with or "").partition("@")
            cfg = cfgmod.validate({"embedder": {"name": embedder_name(base), "precision": precision or "fp32"}}
                                  if built_with else None)
            try:
                cfgmod.dump(cfg, cpath)
                (notify or _stderr)(f"{cpath} was missing; recreated it with default settings and the KB's "
                                    f"embedder ({cfg['embedder']['name']})")
            except OSError:
                pass
        if embedder is not None:
            cfg["embedder"] = {**cfg["embedder"], **({"name": embedder} if isinstance(embedder, str) else embedder)}
        wanted = embedder_model_id(cfg["embedder"])
        if built_with and wanted != built_with:
            raise EmbedderMismatch(
                f"{path} was built with embedder {built_with!r} but {wanted!r} is configured; use the original "
                "embedder, or re-embed every chunk with the new one",
                cli=f"to switch, run: wbrag reindex --kb {path} --re-embed --embedder {cfg['embedder'].get('name')}",
                api="to switch, open with the KB's embedder and call kb.reindex(re_embed=True) after changing it")
        return cls(path, cfg, notify=notify, readonly=readonly)

    @staticmethod
    def configure(path: str | os.PathLike, settings: Iterable[str] = ()) -> dict:
        """Read (no settings) or change a KB's config.toml with 'SECTION.NAME=VALUE' strings; returns the
        validated settings. Works on a file with a bad value, so that value can be put right."""
        path = os.path.abspath(path)
        if not os.path.isfile(os.path.join(path, DB_NAME)):
            raise NotAKnowledgeBase(f"{path}: not a writeback-rag knowledge base (no {DB_NAME})",
                                    cli=f"create one with: wbrag init --kb {path}",
                                    api="create one with KnowledgeBase.create(path)")
        for s in settings:
            if s.split("=", 1)[0].strip().startswith("embedder."):
                raise InputError("the embedder is fixed when a KB is built: every chunk must be embedded again",
                                 cli="switch with: wbrag reindex --re-embed --embedder NAME",
                                 api="switch with kb.reindex(re_embed=True) on a KB opened with the new embedder")
        try:
            return cfgmod.update_file(os.path.join(path, CONFIG_NAME), list(settings))
        except OSError as e:
            raise storage_error(e, path) from None

    def close(self) -> None:
        """Save any index file that has fallen far behind the log, then close the connections."""
        if not getattr(self, "_closed", False) and not self.readonly:
            try:
                self._indexes.save_if_due(self.records)
            except (sqlite3.Error, OSError):
                pass  # read-only or damaged: the files are only caches of the store
        self._closed = True
        self._indexes.close()
        self._conns.close()

    def __enter__(self) -> "KnowledgeBase":
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def conn(self) -> sqlite3.Connection:
        """This thread's connection to kb.sqlite, for read-only reporting (writes go through `corpus`)."""
        if getattr(self, "_closed", False):
            raise InputError(f"{self.path}: this KnowledgeBase is closed; open it again")
        return self._conns.get()

    @property
    def records(self) -> store.Records:
        """This thread's connection as the derived indexes read it (store.Records)."""
        if getattr(self, "_closed", False):
            raise InputError(f"{self.path}: this KnowledgeBase is closed; open it again")
        return self._conns.records()

    @property
    def embedder(self):
        """The embedding model (loaded on first use)."""
        if self._embedder is None:  # its own lock: a search never waits for a writer holding the write lock
            with self._embedder_lock:
                if self._embedder is None:
                    self._embedder = get_embedder(self.config["embedder"])
        return self._embedder

    @contextlib.contextmanager
    def primed(self, texts: Iterable[str]) -> Iterator[None]:
        """Within the block, searches of these texts use vectors embedded once, in batches (write-back
        searches each question of its feedback and fits on all of them: one embedding each, not two)."""
        emb = self.embedder
        if isinstance(emb, CachedEmbedder):  # already wrapped (the evaluation primes its own queries)
            emb.prime(texts)
            yield
            return
        cached = CachedEmbedder(emb)
        cached.prime(texts)
        self._embedder = cached
        try:
            yield
        finally:
            self._embedder = emb

    @property
    def generation(self) -> int:
        """The sequence number of the newest committed change."""
        return head(self.conn)

    @property
    def model_id(self) -> str | None:
        """The embedding model the stored vectors were made with."""
        return store.get_meta(self.conn, "model_id")

    # ---- indexes (owned by indexes.Indexes; writers commit Changes, searches catch up) ----------------

    def _identity(self):
        """What a saved index file must match: this KB (not a copy made before it changed) and its model."""
        conn = self.conn
        return {"model_id": store.get_meta(conn, "model_id"), "kb_created": store.get_meta(conn, "created")}

    def _dim(self):
        return int(store.get_meta(self.conn, "dim", 0) or 0) or self.embedder.dim

    def _ensure_indexes(self, need_dense=True, need_bm25=True):
        """Bring the asked-for indexes to the newest commit (a replay of the change log); returns it."""
        return self._indexes.catch_up(self.records, dense=need_dense, bm25=need_bm25)

    @property
    def _dense(self):
        return self._indexes.dense

    @property
    def _bm25(self):
        return self._indexes.bm25

    @_storage_guard
    def reindex(self, re_embed: bool = False, show_progress: bool = False, backend: str | None = None,
                milvus_uri: str | None = None) -> dict:
        """Rebuild every index from the store; with re_embed, embed every chunk again with the configured
        model (and record it in config.toml). `backend` (embedded or milvus, with `milvus_uri`) moves the
        indexes there, from the stored vectors (no re-embedding), then removes the old ones.
        Returns {"chunks", "generation", "backend"}."""
        old, moved = self._indexes, None
        if backend is not None or milvus_uri is not None:
            moved = copy.deepcopy(self.config)
            moved["index"]["backend"] = backend or moved["index"]["backend"]
            if milvus_uri is not None:
                moved["milvus"]["uri"] = milvus_uri
            moved = cfgmod.validate(moved)
            new = index_backend(moved["index"]["backend"])(self.dense_path, self.bm25_path, self.config,
                                                           self._identity, self._dim, self._notify, self.readonly)
            for section in ("index", "milvus"):
                self.config[section].update(moved[section])
            self._indexes = self.corpus.indexes = new
        try:
            out = self.corpus.reindex(re_embed, show_progress)
        except BaseException:
            if moved is not None:  # nothing moved: the KB keeps its old place
                self._indexes = self.corpus.indexes = old
                self.config.update(cfgmod.load(os.path.join(self.path, CONFIG_NAME)))
            raise
        if re_embed or moved is not None:
            cfgmod.dump(self.config, os.path.join(self.path, CONFIG_NAME))
        if moved is not None and type(old) is not type(self._indexes):
            old.drop(self.records)
        return dict(out, backend=self.config["index"]["backend"])

    @_storage_guard
    def check(self, sample: int = 200, seed: int = 0) -> dict:
        """Compare every index with the records; returns {"ok", "problems", "notes", "counts"}.

        Problems are states that give wrong results (an index that claims to be current and is not: chunks
        missing or extra, vectors that differ from the stored ones, lengths or term statistics that differ from the text); each says
        how to repair it. Notes are normal lags (a saved file older than the KB, rebuilt on next use)."""
        problems, notes, counts = self._indexes.verify(self.records, sample, seed)
        orphans = unit_records.orphans(self.conn)
        if orphans:
            problems.append(f"{orphans} knowledge units have no provenance record; roll back their run")
        return {"ok": not problems, "problems": problems, "notes": notes, "counts": counts}

    # ---- writing documents (the corpus service) --------------------------------------------

    @_storage_guard
    def ingest(self, items: Any, show_progress: bool = False, fields: dict | None = None, stdin: Any = None,
               batch_chunks: int = 2048, commit_seconds: float = 30.0, encoding: str | None = None) -> IngestReport:
        """Add or update documents from paths (str) and/or records (dict/Record); returns an IngestReport.
        Each commit batch is one transaction: a crash loses at most the batch in flight, and re-running the
        same ingest finishes the work (corpus.Corpus.ingest). `encoding`: of text files (default: detected)."""
        return self.corpus.ingest(items, show_progress, fields, stdin, batch_chunks, commit_seconds, encoding)

    @_storage_guard
    def sync(self, folder: str | os.PathLike, dry_run: bool = False, show_progress: bool = False,
             fields: dict | None = None, encoding: str | None = None) -> IngestReport:
        """Make the KB match a folder: new and changed files ingested, documents whose files are gone deleted
        (their units go stale), in one run; `dry_run` writes nothing and reports what would change. The
        folder becomes a source root: ids are relative to it, whatever path is typed later."""
        return self.corpus.sync(os.fspath(folder), dry_run, show_progress, fields, encoding)

    @_storage_guard
    def delete(self, ids: str | Iterable[str]) -> int:
        """Remove documents (and their chunks and vectors) everywhere; returns how many existed."""
        return self.corpus.delete(ids)

    # ---- reading -----------------------------------------------------------------------

    @_storage_guard
    def search(self, query: str, k: int = 5, mode: str | None = None, filters: dict | None = None,
               include_units: bool = True, log: bool = True, source: str = "api", fusion: str | None = None,
               max_units: int | None = None) -> SearchResult:
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
            self.embedder  # a first call loads the model; that is not query latency
        t0 = time.perf_counter()
        r = self.config["retrieval"]
        fusion = fusion or r["fusion"]
        unit_fusion = r["unit_fusion"]
        if fusion not in FUSIONS:
            raise InputError(f"unknown fusion {fusion!r}; use one of {', '.join(FUSIONS)}")
        where = Filter.parse(filters, include_units)
        head = self._ensure_indexes(need_dense=mode != "bm25", need_bm25=mode != "dense")
        if max_units is None and where.kinds == {"source", "unit"} and mode in self._units_off(head):
            where = where.only("source")  # the canary found units worse in this mode (tuning.judge_units)
        kinds = self._indexes.kinds
        units = "unit" in where.kinds and kinds.counts["unit"] > 0
        tuning = self._tuning.get(self.conn, head) if r["learned"] else UNTUNED
        qv = tuning.query_vector(self.embedder.encode([query])[0], mode) if mode != "bm25" else None
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
                fused = self._rerank(ranker, query, fused, bm_all, dn_all, int(tuning.rrf_k or r["rrf_k"]))
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
        return self._indexes.scores(self.records, query, qv, n, where, sparse=mode in ("bm25", "hybrid"),
                                    dense=mode in ("dense", "hybrid"))

    def _rerank(self, ranker, query, fused, bm, dn, rrf_k):
        """The learned ranker's order of the top source candidates, within the slots they held (ranking.py)."""
        kinds = self._indexes.kinds
        cands, X = ranking.inputs(self.records, query, fused, bm, dn, rrf_k, sum(kinds.counts.values()), kinds.is_unit)
        return ranking.reorder(ranker, fused, cands, X)

    def _top(self, fused, k, cap, units):
        """Best k by fused score, at most `cap` of them knowledge units (-1: no cap), so units
        cannot crowd the original documents out of the top k."""
        ranked = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))
        if not units or cap < 0:
            return ranked[:k]
        is_unit = self._indexes.kinds.is_unit
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
            kept = (head, units_off(self.conn))
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
            for r in self.records.hits(missing):
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
        conn = self.conn
        with store.transaction(conn):
            return querylog.log(conn, query, mode, k, params, latency, hits, source)

    @_storage_guard
    def queries(self, last: int = 20, source: str | None = None) -> list[dict]:
        """The query log, newest first, each with its hits, feedback and gate decisions."""
        return [self.query_record(qid) for qid in querylog.recent_ids(self.conn, last, source)]

    @_storage_guard
    def query_record(self, query_id: int) -> dict:
        """One logged query with its hits, feedback and gate decisions; UnknownQuery if there is none."""
        out = querylog.record(self.conn, query_id)
        if out is None:
            from .errors import UnknownQuery
            raise UnknownQuery(f"unknown query id {query_id}", cli=f"list logged queries with: wbrag log --kb {self.path}",
                               api="list logged queries with kb.queries()")
        return out

    @_storage_guard
    def document(self, doc_id: str) -> dict | None:
        """One document or unit as a dict (meta decoded), or None."""
        row = documents.get(self.conn, normalize_id(doc_id))
        return dict(row, meta=json.loads(row["meta"])) if row else None

    @_storage_guard
    def stats(self) -> dict:
        """Counts of documents, chunks, units, queries, feedback and runs, with the model and generation."""
        return {
            "path": self.path,
            "model_id": self.model_id,
            "generation": self.generation,
            **store.counts(self.conn),
            "tuning": self._tuning.get(self.conn).id,
            "units_off": sorted(units_off(self.conn)),
            "dense_index": self.config["dense"]["index"],
            "index_backend": self.config["index"]["backend"],
        }

    # ---- write-back (see feedback.py / writeback.py) ------------------------------------

    @_storage_guard
    def feedback(self, query_id: int, correct: bool, docs: str | Iterable[str] = (), answer: str | None = None,
                 source: str = "user", gold: Iterable[str] = ()) -> int:
        """Record whether a logged query's answer was right and which of its hits (`docs`: document ids,
        or one id) carried it; returns the feedback id. Wrong feedback counts against the units among the
        named (or else all) hits: `writeback.retire_after_wrong` such events retire a unit."""
        from .feedback import add_feedback

        return add_feedback(self, query_id, correct, docs, answer, source, gold)

    @_storage_guard
    def answer(self, question: str, k: int = 5, mode: str | None = None, source: str = "api") -> dict:
        """Retrieve, then answer with the configured LLM: {"query_id", "answer", "hits"} (logged)."""
        from .feedback import answer

        return answer(self, question, k=k, mode=mode, source=source)

    @_storage_guard
    def label(self, path: Any, split: str = "train", k: int | None = None, mode: str | None = None,
              show_progress: bool = False) -> dict:
        """Run a labelled set (JSONL file, BEIR folder or a list of {query, answers, relevant} dicts):
        retrieve, judge, store gate decisions and feedback; returns counts and the query ids."""
        from .feedback import run_labelled

        return run_labelled(self, path, split=split, k=k, mode=mode, show_progress=show_progress)

    @_storage_guard
    def writeback(self, distiller: str | None = None, dry_run: bool = False, show_progress: bool = False) -> dict:
        """Turn the feedback since the last run into knowledge units. The result always has the same keys:
        run_id (None for a dry run), dry_run, distiller, units (what was written or revived), and the counts
        examples, passed_utility, docs_kept, written, merged, revived, rejected."""
        from .writeback import run_writeback

        return run_writeback(self, distiller=distiller, dry_run=dry_run, show_progress=show_progress)

    @_storage_guard
    def rollback(self, run_id: str) -> int:
        """Remove a run's units from the records and every index; returns how many."""
        from .writeback import rollback

        return rollback(self, run_id)

    @_storage_guard
    def units(self, include_inactive: bool = True, ids: Iterable[str] | None = None) -> list[dict]:
        """Knowledge units with their provenance, oldest first; `ids`: only those units."""
        from .writeback import list_units

        return list_units(self, include_inactive=include_inactive, ids=ids)

    @_storage_guard
    def runs(self) -> list[dict]:
        """Write-back runs with their counts, oldest first."""
        from .writeback import list_runs

        return list_runs(self)

    @_storage_guard
    def tunings(self) -> list[dict]:
        """What write-back learned for retrieval (query adapter, fusion weights), oldest first: each fit with its
        run, status (adopted, inactive, rolled-back), the canary's figures and why it was or was not adopted."""
        from .tuning import list_tunings

        return list_tunings(self.conn)

    @_storage_guard
    def retire(self, unit_id: str) -> str:
        """Take one unit out of retrieval for good (until restored); returns its previous status."""
        return self._set_unit_status(unit_id, "retired")

    @_storage_guard
    def restore(self, unit_id: str) -> str:
        """Return a retired or stale unit to retrieval (its count of wrong answers starts again)."""
        return self._set_unit_status(unit_id, "active")

    def _set_unit_status(self, unit_id, status):
        unit_id = normalize_id(unit_id)
        conn = self.conn
        with self.corpus.changing(conn) as change:
            was = unit_records.unit_status(conn, unit_id)
            if was is None:
                raise InputError(f"no knowledge unit {unit_id!r}", cli=f"list units with: wbrag units list --kb {self.path}",
                                 api="list units with kb.units()")
            if status == "active":
                other = unit_records.current_sibling(conn, unit_id)
                if other is not None:
                    raise InputError(f"unit {other} is the current unit of the same source passage; "
                                     f"retire it before restoring {unit_id}")
            self.corpus.set_status(conn, unit_id, status, change)
            # by hand, not by a run: no rollback changes it back
            unit_records.clear_end(conn, unit_id)
            if status == "active":
                unit_records.reset_against(conn, unit_id)
        return was

    # ---- async (apps on an event loop) ---------------------------------------------------

    async def asearch(self, query: str, **kwargs: Any) -> SearchResult:
        """`search` in a worker thread: the event loop keeps running while SQLite, FAISS and the embedder
        work (each thread has its own connection)."""
        import asyncio

        return await asyncio.to_thread(self.search, query, **kwargs)

    async def afeedback(self, query_id: int, correct: bool, **kwargs: Any) -> int:
        """`feedback` in a worker thread."""
        import asyncio

        return await asyncio.to_thread(self.feedback, query_id, correct, **kwargs)

    @property
    def llm(self):
        from .backends import get_llm

        with self._llm_lock:
            if self._llm is None:
                self._llm = get_llm(self.config.get("llm"))
            return self._llm


def _stderr(msg):
    print(f"wbrag: {msg}", file=sys.stderr)


def _units_go_stale(corpus, conn, doc_id, change):
    """Units distilled from a changed or deleted source go stale (write-back's rule)."""
    from .writeback import mark_stale_units

    mark_stale_units(corpus, conn, doc_id, change)


def embedder_name(model_id):
    """The registered embedder name whose model id is `model_id`, else the id itself (a model folder)."""
    from .backends import EMBEDDERS

    for name, factory in EMBEDDERS.items():
        if getattr(factory, "model_id", None) == model_id:
            return name
    return model_id
