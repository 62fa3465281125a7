"""The corpus: every write to the documents and their chunks (ingest, delete, status changes, reindex).

Each write is one transaction that stores the rows and records the Change it makes to the indexes
(changes.py); the indexes catch up on their next use. Write-back and feedback write through the same
methods, so there is one way to add, remove, retire or restore a document."""

import contextlib
import json
import os
import threading
import time

import numpy as np

from . import store
from .errors import InputError
from .store import documents
from .store import units as unit_records
from .store.changes import Change, record, recount_terms
from .loaders import IngestReport, Problem, Record, _field_record, estimate, read_paths
from .progress import progress as _progress
from .text import chunk_text, content_hash, count_tokens, index_text, normalize_id

EMBED_GROUP = 256  # chunks per encode call: the progress bar moves after each


class Corpus:
    """The documents of one KB in one process: one writer at a time here (`lock`); SQLite serialises
    writers across processes."""

    def __init__(self, connection, indexes, config, embedder, on_source_changed):
        """`connection()`: this thread's connection; `embedder()`: the model (loaded on first use);
        `on_source_changed(corpus, conn, doc_id, change)`: what a changed or deleted source does to the
        units drawn from it."""
        self._connection, self.indexes, self.config = connection, indexes, config
        self._embedder, self.on_source_changed = embedder, on_source_changed
        self.lock = threading.RLock()
        self._term_ids = None  # terms are append-only: one dict serves every write

    @property
    def conn(self):
        return self._connection()

    @contextlib.contextmanager
    def changing(self, conn):
        """A write transaction (under this process's write lock) that records the Change it makes; after the
        commit, the indexes this process has loaded apply it at once, so its next search pays nothing."""
        with self.lock:
            if self._term_ids is None:
                self._term_ids = {}
            change = Change(self._term_ids)
            try:
                with store.transaction(conn):
                    yield change
                    if change:
                        record(conn, change)
            except BaseException:
                self._term_ids = None  # ids inserted by a rolled-back transaction do not exist
                raise
            if change:
                self.indexes.refresh(store.Records(conn))

    @property
    def embedder(self):
        return self._embedder()

    # ---- source roots: ids stay the same whatever path is typed -------------------------------------

    def roots(self):
        """Folders registered by sync: a file under one gets an id relative to it."""
        return json.loads(store.get_meta(self.conn, "source_roots", "[]"))

    def root_for(self, path):
        p = os.path.abspath(path)
        inside = [r for r in self.roots() if p == r or p.startswith(r.rstrip(os.sep) + os.sep)]
        return max(inside, key=len) if inside else None

    def sync(self, path, dry_run=False, show_progress=False, fields=None, encoding=None):
        """Make the KB match a folder: new and changed files are ingested, and documents whose files are
        gone (or whose records a file no longer holds) are deleted, their units going stale, in the same
        run. The folder becomes a source root (ids relative to it). A file that fails to read keeps its
        documents. With dry_run nothing is written and the report says what would change."""
        root = os.path.abspath(path)
        if not os.path.isdir(root):
            raise InputError(f"{path}: not a folder; sync keeps a KB in step with a folder of files")
        fields = {**{k: self.config["ingest"][k] for k in ("id_field", "title_field", "text_field")}, **(fields or {})}
        max_bytes = int(float(self.config["ingest"]["max_doc_mb"]) * 1e6)
        items = list(read_paths([root], fields, max_bytes, encoding=encoding, root=root,
                                sources=self.config["ingest"]["sources"]))
        records = [r for r in items if isinstance(r, Record)]
        problems = [p for p in items if isinstance(p, Problem)]
        failed = {os.path.abspath(p.where) for p in problems if p.error}
        seen = {normalize_id(r.id) for r in records}
        conn = self.conn
        under = root.rstrip(os.sep) + os.sep
        stored = documents.sources_under(conn, root, under)
        gone = [r["id"] for r in stored if r["id"] not in seen and r["source"] not in failed]
        if dry_run:
            report = IngestReport(skipped=problems, dry_run=True, deleted=len(gone))
            hashes = documents.hashes(conn)
            for r in records:
                h = hashes.get(normalize_id(r.id))
                if h is None:
                    report.added += 1
                elif h == content_hash(r.title, r.text, json.dumps(r.meta, sort_keys=True)):
                    report.unchanged += 1
                else:
                    report.updated += 1
            return report
        with self.lock:
            with store.transaction(conn):
                if root not in self.roots():
                    store.set_meta(conn, "source_roots", json.dumps(sorted(self.roots() + [root])))
            report = self.ingest(records, show_progress=show_progress, fields=fields)
            report.skipped = problems + report.skipped
            report.deleted = self.delete(gone) if gone else 0
        return report

    def ingest(self, items, show_progress=False, fields=None, stdin=None, batch_chunks=2048, commit_seconds=30.0,
               encoding=None):
        """Add or update documents from paths (str) and/or records (dict/Record); returns an IngestReport.
        Whether a document is new, changed or unchanged is decided inside the write transaction.

        Each document is written with its chunks, embeddings and term statistics in one transaction, so a
        crash loses at most the batch in flight, and re-running the same ingest finishes the work.
        Big batches keep ingest speed flat as the KB grows: each commit rewrites the pages it touched,
        and small batches touch the same pages over and over (eval/results/ingest-batching.md).
        A commit holds what the embedder does in about `commit_seconds` (at least EMBED_GROUP chunks, at most
        `batch_chunks`): a slow embedder still commits every few seconds. Its chunks are sorted by length once
        and embedded EMBED_GROUP at a time; the progress bar moves after each group."""
        if isinstance(items, (str, os.PathLike, dict, Record)):
            items = [items]
        fields = {**{k: self.config["ingest"][k] for k in ("id_field", "title_field", "text_field")}, **(fields or {})}
        report = IngestReport()
        paths = [os.fspath(i) for i in items if isinstance(i, (str, os.PathLike))]
        records = [i for i in items if not isinstance(i, (str, os.PathLike))]
        max_bytes = int(float(self.config["ingest"]["max_doc_mb"]) * 1e6)

        def stream():
            for n, r in enumerate(records, 1):
                if isinstance(r, Record):
                    yield r
                    continue
                try:
                    yield _field_record(r, fields, f"record {n}", r.get("source", "api") if isinstance(r, dict) else "api")
                except ValueError as e:
                    yield Problem("<records>", str(e))
            for path in paths:  # under a source root, ids are relative to it
                yield from read_paths([path], fields, max_bytes, stdin=stdin, encoding=encoding,
                                      root=self.root_for(path) if path != "-" else None,
                                      sources=self.config["ingest"]["sources"])

        with self.lock:
            conn = self.conn
            seen, pending, pending_chunks = {}, [], 0
            window = min(batch_chunks, EMBED_GROUP)  # chunks per commit: grows to what commit_seconds embeds

            def commit_window():
                """The window's chunks sorted once by length and embedded in groups of similar length (less
                padding than groups in arrival order), then written in arrival order in one transaction."""
                nonlocal window
                started = time.monotonic()
                texts = [index_text(p[0].title, c) for p in pending for c in p[2]]
                sizes = np.array([len(p[2]) for p in pending])
                ends = np.cumsum(sizes)
                order = np.argsort(np.array([len(t) for t in texts]), kind="stable")
                position = np.empty(len(texts), dtype=np.int64)
                position[order] = np.arange(len(texts))
                last = np.maximum.reduceat(position, ends - sizes)  # a document is done with its last chunk
                done_at = np.sort(last)
                vecs, done = None, 0
                count = getattr(self.embedder, "truncated", None)
                for g in range(0, len(texts), EMBED_GROUP):
                    part = order[g:g + EMBED_GROUP]
                    group = [texts[i] for i in part]
                    v = self.embedder.encode(group)
                    if vecs is None:
                        vecs = np.empty((len(texts), v.shape[1]), dtype=np.float32)
                    vecs[part] = v
                    if count is not None:
                        report.truncated += count(group)
                    upto = int(np.searchsorted(done_at, g + len(part)))
                    bar.update(upto - done, embedded=upto - done)
                    done = upto
                rate = len(texts) / max(time.monotonic() - started, 1e-6)
                window = int(min(batch_chunks, max(EMBED_GROUP, rate * commit_seconds)))
                self.write(pending, report, embedded=(texts, vecs))

            total = estimate(paths) if show_progress else None
            bar = _progress(None, show_progress, "ingesting", unit="doc",
                            total=None if total is None else total + len(records))
            for item in stream():
                if isinstance(item, Problem):
                    report.skipped.append(item)
                    bar.update(1, skipped=1)
                    continue
                rec = item
                rec.id = normalize_id(rec.id)
                where = rec.source or "<records>"
                if rec.id in seen:
                    report.skipped.append(Problem(where, f"duplicate id {rec.id!r} (first seen in {seen[rec.id]}); "
                                                         "ids must be unique: choose another id field or rename"))
                    bar.update(1, skipped=1)
                    continue
                seen[rec.id] = where
                if rec.id.startswith("unit:"):
                    report.skipped.append(Problem(where, f"id {rec.id!r}: the 'unit:' prefix is reserved for knowledge units"))
                    bar.update(1, skipped=1)
                    continue
                if not rec.text.strip():
                    report.skipped.append(Problem(where, f"document {rec.id!r} has no text", error=False))
                    bar.update(1, skipped=1)
                    continue
                h = content_hash(rec.title, rec.text, json.dumps(rec.meta, sort_keys=True))
                old_hash = documents.stored_hash(conn, rec.id)
                if old_hash == h:
                    report.unchanged += 1
                    bar.update(1, unchanged=1)
                    continue
                chunks = chunk_text(rec.text, self.config["chunking"]["size"], self.config["chunking"]["overlap"])
                pending.append((rec, h, chunks, old_hash is not None, None))
                pending_chunks += len(chunks)
                if pending_chunks >= window:
                    commit_window()
                    pending, pending_chunks = [], 0
            if pending:
                commit_window()
            bar.close()
            self.indexes.save_if_due(store.Records(conn))  # a big ingest leaves files the next process loads, not rebuilds
        return report

    def _embed(self, pending):
        texts = [index_text(p[0].title, c) for p in pending for c in p[2]]
        return texts, self.embedder.encode(texts)

    def write(self, pending, report, kind="source", embedded=None, also=None):
        """Documents in one transaction with their chunks, vectors, term statistics and Change; returns
        the chunk ids added. pending: (record, hash, chunks, exists, unit provenance or None) each;
        `embedded`: their (texts, vectors) when already computed; `also(conn, change)`: more writes that
        must commit with them (the units a new unit version supersedes)."""
        emb = self.embedder
        texts, vecs = embedded if embedded is not None else self._embed(pending)
        conn = self.conn
        with self.changing(conn) as change:
            self._write_batch(conn, pending, report, kind, texts, vecs, emb, change)
            if also is not None:
                also(conn, change)
        return change.added

    def _write_batch(self, conn, pending, report, kind, texts, vecs, emb, change):
        t = time.time()
        i = 0
        for rec, h, chunks, _, provenance in pending:
            # whether it exists is decided here, in the write transaction: another writer may have
            # stored the same document since it was read (two ingests of one file at once)
            old_hash = documents.stored_hash(conn, rec.id)
            exists = old_hash is not None
            if exists and old_hash == h and provenance is None:
                report.unchanged += 1
                i += len(chunks)
                continue
            if exists:
                old = documents.chunk_ids(conn, rec.id)
                change.remove(conn, old)
                documents.delete_chunks(conn, rec.id)
                self.on_source_changed(self, conn, rec.id, change)
            documents.put(conn, rec.id, kind, rec.title, rec.text, rec.source, rec.meta, h, t)
            added = []
            for seq, c in enumerate(chunks):
                chunk_id = documents.add_chunk(conn, rec.id, seq, c, count_tokens(c), vecs[i].tobytes(), emb.model_id)
                added.append((chunk_id, texts[i], kind))
                i += 1
            change.add(conn, added)
            if exists:
                report.updated += 1
            else:
                report.added += 1
            report.chunks += len(chunks)
            if provenance is not None:  # a knowledge unit: its provenance commits with it
                documents.add_provenance(conn, provenance)
        store.set_meta(conn, "dim", emb.dim)

    def delete(self, ids):
        """Remove documents (and their chunks, postings, vectors) everywhere; returns how many existed."""
        ids = [normalize_id(i) for i in ([ids] if isinstance(ids, str) else list(ids))]
        with self.lock:
            conn = self.conn
            n = 0
            with self.changing(conn) as change:
                for doc_id in ids:
                    n += self.remove(conn, doc_id, change)
            self.indexes.save_if_due(store.Records(conn))
        return n

    def remove(self, conn, doc_id, change):
        """Delete one document (a unit: with its provenance) inside the caller's transaction; the units
        drawn from it go stale. Returns 1 if it existed."""
        if not documents.exists(conn, doc_id):
            return 0
        change.remove(conn, documents.chunk_ids(conn, doc_id))
        self.on_source_changed(self, conn, doc_id, change)
        documents.delete(conn, doc_id)
        return 1

    def set_status(self, conn, doc_id, status, change):
        """Take a document's chunks out of (or back into) both indexes inside the caller's transaction;
        the caller records `change` in the same transaction."""
        cur = documents.status_and_title(conn, doc_id)
        if cur is None or cur["status"] == status:
            return
        rows = documents.chunks(conn, doc_id)
        if cur["status"] == "active":  # out of the indexes while its rows still say what was indexed
            change.remove(conn, [r["id"] for r in rows])
        documents.set_status(conn, doc_id, status)
        if status == "active":
            change.add(conn, [(r["id"], index_text(cur["title"], r["text"]), r["kind"]) for r in rows])

    def set_unit_status(self, unit_id, status, kb_path):
        """Retire a unit by hand, or restore one (its count of wrong answers starts again); returns its previous
        status. No run did it, so no rollback undoes it."""
        conn = self.conn
        with self.changing(conn) as change:
            was = unit_records.unit_status(conn, unit_id)
            if was is None:
                raise InputError(f"no knowledge unit {unit_id!r}", cli=f"list units with: wbrag units list --kb {kb_path}",
                                 api="list units with kb.units()")
            if status == "active":
                other = unit_records.current_sibling(conn, unit_id)
                if other is not None:
                    raise InputError(f"unit {other} is the current unit of the same source passage; "
                                     f"retire it before restoring {unit_id}")
            self.set_status(conn, unit_id, status, change)
            unit_records.clear_end(conn, unit_id)
            if status == "active":
                unit_records.reset_against(conn, unit_id)
        return was

    def reindex(self, re_embed=False, show_progress=False):
        """Rebuild every index from the store; with re_embed, embed every chunk again with the configured model."""
        with self.lock:
            conn = self.conn
            if re_embed:
                emb = self.embedder
                rows = documents.chunks_to_embed(conn)
                for start in _progress(range(0, len(rows), 256), show_progress, "re-embedding"):
                    part = rows[start:start + 256]
                    vecs = emb.encode([index_text(r["title"], r["text"]) for r in part])  # as ingest embeds them
                    with store.transaction(conn):
                        documents.set_embeddings(conn, [(v.tobytes(), emb.model_id, r["id"])
                                                        for r, v in zip(part, vecs)])
                with store.transaction(conn):
                    store.set_meta(conn, "model_id", emb.model_id)
                    store.set_meta(conn, "dim", emb.dim)
            with store.transaction(conn):
                recount_terms(conn)
                change = Change()
                change.rebuild_all()
                gen = record(conn, change)
            self.indexes.reset()
            self.indexes.catch_up(store.Records(conn))  # rebuilds both (the change resets them) and saves their files
            return {"chunks": self.indexes.dense.count, "generation": gen}

