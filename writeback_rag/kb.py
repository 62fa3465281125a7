"""KnowledgeBase: the public API that the CLI and other apps use."""

import contextlib
import copy
import json
import os
import sqlite3
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator

from . import config as cfgmod
from . import store
from .backends import CachedEmbedder, embedder_model_id, get_embedder
from .errors import EmbedderMismatch, InputError, NotAKnowledgeBase, storage_error, translating
from .store import documents, querylog
from .store import units as unit_records
from .store.changes import head
from .corpus import Corpus
from .indexes import backend as index_backend
from .loaders import IngestReport
from .text import normalize_id
from .search import Hit, SearchResult, Search
from .tuning import fuse, units_off

DB_NAME, DENSE_NAME, BM25_NAME, CONFIG_NAME = "kb.sqlite", "dense.faiss", "bm25.npz", "config.toml"
VECTOR_SETTINGS = ("embedder.name", "embedder.precision")  # what the stored vectors were made with
__all__ = ["KnowledgeBase", "Hit", "SearchResult", "IngestReport", "fuse"]



_storage_guard = translating(lambda kb, e: storage_error(e, kb.path)
                             if isinstance(e, (sqlite3.DatabaseError, OSError)) else None)
_storage_guard.__doc__ = "sqlite3 and OS failures below a public method become one StorageError saying what to do."


# a hit's chunk and its document's header in one statement (the header from its covering index: a
# document's row also holds its whole text)
class KnowledgeBase:
    """A folder: kb.sqlite (truth), dense.faiss and bm25.npz with manifests (derived), config.toml."""

    def __init__(self, path, cfg, embedder=None, notify=None, readonly=False):
        self.path = os.path.abspath(path)
        self.readonly = readonly
        self.config = cfg
        self.db_path = os.path.join(self.path, DB_NAME)
        self.dense_path = os.path.join(self.path, DENSE_NAME)
        self.bm25_path = os.path.join(self.path, BM25_NAME)
        self._conns = store.Connections(self.db_path, readonly)
        self._embedder_lock = threading.Lock()
        self._llm_lock = threading.Lock()  # its own: loading the LLM never waits for (or blocks) a writer
        self._embedder = embedder
        self._notify = notify or _stderr
        indexes = index_backend(cfg["index"]["backend"])(
            self.dense_path, self.bm25_path, cfg, self._identity, self._dim, self._notify, readonly)
        self._llm = None
        self.corpus = Corpus(lambda: self.conn, indexes, cfg, lambda: self.embedder, _units_go_stale)
        self._search = Search(self.path, cfg, lambda: self.corpus.indexes, lambda: self.records, lambda: self.conn,
                              lambda: self.embedder, readonly)

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
    def open(cls, path: str | os.PathLike, embedder: str | dict | None = None,
             notify: Callable[[str], Any] | None = None, readonly: bool | None = None) -> "KnowledgeBase":
        """Open an existing KB; refuses one built with another embedder than `embedder`/config asks for
        (`embedder`: a name, or settings of the [embedder] table such as {"precision": "bf16"}).

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
            if s.split("=", 1)[0].strip() in VECTOR_SETTINGS:
                raise InputError("the embedder is fixed when a KB is built: every chunk must be embedded again",
                                 cli="switch with: wbrag reindex --re-embed --embedder NAME (or --precision P)",
                                 api="switch with kb.reindex(re_embed=True) on a KB opened with the new embedder")
        try:
            return cfgmod.update_file(os.path.join(path, CONFIG_NAME), list(settings))
        except OSError as e:
            raise storage_error(e, path) from None

    def close(self) -> None:
        """Save any index file that has fallen far behind the log, then close the connections."""
        if not getattr(self, "_closed", False) and not self.readonly:
            try:
                self.corpus.indexes.save_if_due(self.records)
            except (sqlite3.Error, OSError):
                pass  # read-only or damaged: the files are only caches of the store
        self._closed = True
        self.corpus.indexes.close()
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
        return self.corpus.indexes.catch_up(self.records, dense=need_dense, bm25=need_bm25)

    @property
    def _indexes(self):
        return self.corpus.indexes

    @property
    def _dense(self):
        return self.corpus.indexes.dense

    @property
    def _bm25(self):
        return self.corpus.indexes.bm25

    @_storage_guard
    def reindex(self, re_embed: bool = False, show_progress: bool = False, backend: str | None = None,
                milvus_uri: str | None = None) -> dict:
        """Rebuild every index from the store; with re_embed, embed every chunk again with the configured
        model (and record it in config.toml). `backend` (embedded or milvus, with `milvus_uri`) moves the
        indexes there, from the stored vectors (no re-embedding), then removes the old ones.
        Returns {"chunks", "generation", "backend"}."""
        old, moved = self.corpus.indexes, None
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
            self.corpus.indexes = new
        try:
            out = self.corpus.reindex(re_embed, show_progress)
        except BaseException:
            if moved is not None:  # nothing moved: the KB keeps its old place
                self.corpus.indexes = old
                self.config.update(cfgmod.load(os.path.join(self.path, CONFIG_NAME)))
            raise
        if re_embed:  # `auto` is decided by this embedding: the KB keeps the precision its vectors were made in
            self.config["embedder"]["precision"] = getattr(self.embedder, "precision", "fp32")
        if re_embed or moved is not None:
            cfgmod.dump(self.config, os.path.join(self.path, CONFIG_NAME))
        if moved is not None and type(old) is not type(self.corpus.indexes):
            old.drop(self.records)
        return dict(out, backend=self.config["index"]["backend"])

    @_storage_guard
    def check(self, sample: int = 200, seed: int = 0) -> dict:
        """Compare every index with the records; returns {"ok", "problems", "notes", "counts"}.

        Problems are states that give wrong results (an index that claims to be current and is not: chunks
        missing or extra, vectors that differ from the stored ones, lengths or term statistics that differ from the text); each says
        how to repair it. Notes are normal lags (a saved file older than the KB, rebuilt on next use)."""
        problems, notes, counts = self.corpus.indexes.verify(self.records, sample, seed)
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
        return self._search.search(query, k, mode, filters, include_units, log, source, fusion, max_units)

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
            "tuning": self._search.tuning.get(self.conn).id,
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
        return self.corpus.set_unit_status(normalize_id(unit_id), status, self.path)

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
