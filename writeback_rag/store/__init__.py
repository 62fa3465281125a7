"""SQLite store: the single source of truth; every index is derived from it.

The package holds the connection, the migrations and the change log (`changes`); `Records` (records.py) is
what the derived indexes read from it."""

import os
import sqlite3
import threading
import urllib.parse
import time

# Numbered migrations, applied in order on open; PRAGMA user_version records the last one.
MIGRATIONS = [
    # 1: documents (source files and, later, knowledge units), their chunks with embeddings,
    #    a BM25 inverted index kept in the same transactions, and the query log.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
    CREATE TABLE documents (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL DEFAULT 'source',      -- 'source' | 'unit'
        title TEXT NOT NULL DEFAULT '',
        text TEXT NOT NULL,
        source TEXT,                              -- file path or origin
        meta TEXT NOT NULL DEFAULT '{}',          -- JSON object, used by filters
        hash TEXT NOT NULL,                       -- content hash: unchanged docs are skipped
        status TEXT NOT NULL DEFAULT 'active',    -- only 'active' documents are indexed
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE TABLE chunks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,     -- also the FAISS id
        doc_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        text TEXT NOT NULL,
        n_tokens INTEGER NOT NULL,
        bm25_len INTEGER NOT NULL,  -- no longer written or read: each index counts lengths from the text
        embedding BLOB NOT NULL,                  -- float32, normalized
        model TEXT NOT NULL
    );
    CREATE INDEX chunks_doc ON chunks(doc_id);
    CREATE TABLE terms (id INTEGER PRIMARY KEY, term TEXT NOT NULL UNIQUE);
    CREATE TABLE postings (
        term_id INTEGER NOT NULL,
        chunk_id INTEGER NOT NULL,
        tf INTEGER NOT NULL,
        PRIMARY KEY (term_id, chunk_id)
    ) WITHOUT ROWID;
    CREATE INDEX postings_chunk ON postings(chunk_id);
    CREATE TABLE queries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        text TEXT NOT NULL,
        ts REAL NOT NULL,
        mode TEXT NOT NULL,
        k INTEGER NOT NULL,
        params TEXT NOT NULL DEFAULT '{}',
        latency_ms REAL,
        source TEXT NOT NULL DEFAULT 'api',
        answer TEXT
    );
    CREATE TABLE hits (
        query_id INTEGER NOT NULL REFERENCES queries(id) ON DELETE CASCADE,
        rank INTEGER NOT NULL,
        chunk_id INTEGER NOT NULL,
        doc_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        bm25 REAL, dense REAL, fused REAL,
        PRIMARY KEY (query_id, rank)
    );
    CREATE INDEX hits_doc ON hits(doc_id);
    """,
    # 2: the write-back loop: feedback events, labelled examples with gate decisions,
    #    knowledge-unit provenance (a unit is also a row of documents with kind='unit'), runs.
    """
    CREATE TABLE feedback (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        query_id INTEGER NOT NULL REFERENCES queries(id),
        correct INTEGER NOT NULL,
        docs TEXT NOT NULL DEFAULT '[]',          -- JSON list of doc ids that carried the answer
        answer TEXT,
        gold TEXT NOT NULL DEFAULT '[]',          -- JSON list of gold answers (labelled runs)
        source TEXT NOT NULL DEFAULT 'user',
        ts REAL NOT NULL
    );
    CREATE INDEX feedback_query ON feedback(query_id);
    CREATE TABLE gate_decisions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL,
        query_id INTEGER NOT NULL,
        gate TEXT NOT NULL,                       -- 'utility' | 'document'
        doc_id TEXT,
        passed INTEGER NOT NULL,
        s_nr REAL, s_rag REAL, s_doc REAL,
        reason TEXT NOT NULL
    );
    CREATE INDEX gate_query ON gate_decisions(query_id);
    CREATE TABLE units (
        id TEXT PRIMARY KEY REFERENCES documents(id),
        query_ids TEXT NOT NULL,
        feedback_ids TEXT NOT NULL,
        source_doc_ids TEXT NOT NULL,
        source_chunk_ids TEXT NOT NULL,
        distiller TEXT NOT NULL,
        model TEXT,
        run_id TEXT NOT NULL,
        created REAL NOT NULL,
        against INTEGER NOT NULL DEFAULT 0        -- wrong-feedback events counted against the unit
    );
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        started REAL NOT NULL,
        finished REAL,
        status TEXT NOT NULL,                     -- 'running' | 'done' | 'failed' | 'dry-run' | 'rolled-back'
        watermark INTEGER NOT NULL DEFAULT 0,     -- last feedback id covered by this run
        distiller TEXT,
        counts TEXT NOT NULL DEFAULT '{}',
        error TEXT
    );
    """,
    # 3: the near-duplicate check looks units up by their source set.
    """
    CREATE INDEX units_sources ON units(source_doc_ids);
    """,
    # 4: the change log (changes.py): chunks added and removed per commit, in commit order; derived
    #    indexes replay it from the sequence number they have applied. Numbering goes on from the
    #    generation counter that came before it.
    """
    CREATE TABLE changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        added BLOB NOT NULL,                      -- int64 chunk ids
        removed BLOB NOT NULL,                    -- int64 chunk ids
        removed_postings BLOB NOT NULL,           -- int64 (term_id, chunk_id, tf) rows of removed chunks
        reset INTEGER NOT NULL DEFAULT 0          -- 1: rebuild every index (reindex)
    );
    INSERT INTO changes(seq, added, removed, removed_postings, reset)
        SELECT CAST(value AS INTEGER), x'', x'', x'', 1 FROM meta WHERE key='generation' AND CAST(value AS INTEGER) > 0;
    """,
    # 5: the active units are looked up after every change (the unit cap): by index, not a scan of documents.
    """
    CREATE INDEX documents_kind ON documents(kind, status);
    """,
    # 6: postings are no longer stored (indexes tokenize the chunks they add; changes.py): the table and
    #    its chunk index were 45% of the database. Each term keeps its document frequency over the active
    #    source chunks instead, which write-back reads without loading an index.
    """
    ALTER TABLE terms ADD COLUMN df INTEGER NOT NULL DEFAULT 0;
    UPDATE terms SET df=(SELECT COUNT(*) FROM postings p JOIN chunks c ON c.id=p.chunk_id
                         JOIN documents d ON d.id=c.doc_id
                         WHERE p.term_id=terms.id AND d.kind='source' AND d.status='active');
    DROP INDEX postings_chunk;
    DROP TABLE postings;
    """,
    # 7: retrieval that learns (tuning.py): each write-back's fitted query adapter and fusion weights with the
    #    canary's verdict; feedback keeps the documents a labelled set names relevant, retrieved or not.
    """
    ALTER TABLE feedback ADD COLUMN relevant TEXT NOT NULL DEFAULT '[]';
    CREATE TABLE tunings (
        id TEXT PRIMARY KEY,
        run_id TEXT NOT NULL,
        created REAL NOT NULL,
        status TEXT NOT NULL,                     -- 'adopted' | 'inactive' | 'rolled-back'
        model TEXT,                               -- the embedder the adapter was fitted for
        dim INTEGER NOT NULL,
        bm25_weight REAL NOT NULL,
        rrf_k INTEGER NOT NULL,
        hybrid_adapter INTEGER NOT NULL,          -- 1: hybrid searches use the adapter too
        adapter BLOB,                             -- float32 (dim, dim), or NULL: fusion weights only
        examples INTEGER NOT NULL,
        holdout INTEGER NOT NULL,
        metrics TEXT NOT NULL DEFAULT '{}',
        reason TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX tunings_status ON tunings(status, model, created);
    """,
    # 8: compact units (writeback.py): one active unit per source passage (its anchor), extended by the
    #    questions that draw on it; ended_by names the run that superseded or retired a unit, so rolling
    #    that run back brings it back.
    """
    ALTER TABLE units ADD COLUMN anchor TEXT;
    ALTER TABLE units ADD COLUMN ended_by TEXT;
    UPDATE units SET anchor = json_extract(source_doc_ids, '$[0]');
    CREATE INDEX units_anchor ON units(anchor);
    CREATE INDEX units_ended_by ON units(ended_by);
    """,
    # 9: a run that makes an earlier version current again records what it was (revived: {run, status,
    #    ended_by}), so rolling that run back puts it back as it was. Units are found by their passage
    #    (anchor) now, no longer by their source set.
    """
    ALTER TABLE units ADD COLUMN revived TEXT;
    DROP INDEX IF EXISTS units_sources;
    """,
    # 10: a hit's document header (title, kind, source, meta) read from an index that holds it, not from the
    #     document's row, where it sits after the text: a long document's text spans overflow pages, which
    #     SQLite walks to reach the columns after it.
    """
    CREATE INDEX documents_header ON documents(id, title, kind, source, meta);
    """,
    # 11: a tuning may carry a learned reranker for hybrid search (ranking.py): its weights as JSON.
    """
    ALTER TABLE tunings ADD COLUMN ranker TEXT;
    """,
    # 12: ... and a cross-encoder its hybrid ranker reads (crossencoder.py): the trained weights' bytes.
    """
    ALTER TABLE tunings ADD COLUMN cross_encoder BLOB;
    """,
]


def connect(path, readonly=False):
    """Open with WAL and foreign keys; a busy timeout lets readers and one writer share the file.
    Read-only: mode=ro, or immutable=1 on media where SQLite cannot even create the WAL's shared memory."""
    quoted = urllib.parse.quote(os.path.abspath(path))
    if readonly:
        try:
            conn = sqlite3.connect(f"file:{quoted}?mode=ro", uri=True, timeout=30, check_same_thread=False,
                                   isolation_level=None)
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        except sqlite3.OperationalError:
            conn = sqlite3.connect(f"file:{quoted}?immutable=1", uri=True, timeout=30, check_same_thread=False,
                                   isolation_level=None)
    else:
        conn = sqlite3.connect(f"file:{quoted}", uri=True, timeout=30, check_same_thread=False, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    # 64 MiB page cache (allocated as used) instead of 2 MiB: a write batch touches term rows all over
    # their table, and a small cache spills them before the commit
    conn.execute("PRAGMA cache_size=-65536")
    if not readonly:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def migrate(conn):
    """Apply pending migrations, each in its own transaction."""
    done = version(conn)
    for number, sql in enumerate(MIGRATIONS[done:], start=done + 1):
        with transaction(conn):
            for statement in _statements(sql):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={number}")
    return len(MIGRATIONS)


def _statements(sql):
    out, buf = [], []
    for line in sql.splitlines():
        line = line.split("--", 1)[0] if "--" in line else line
        buf.append(line)
        joined = "\n".join(buf)
        if sqlite3.complete_statement(joined):
            if joined.strip():
                out.append(joined.strip())
            buf = []
    return out


class transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception (so nothing is half-written)."""

    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")
        return False


def version(conn):
    """The schema version (the number of migrations applied; 0 for an empty or foreign database)."""
    return conn.execute("PRAGMA user_version").fetchone()[0]


def has_meta_table(conn):
    """Whether the database has our meta table (with version(), what tells a KB from another database)."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone() is not None


def counts(conn):
    """What stats() reports of the records: sources, their chunks, units by status, queries, feedback, runs."""
    one = lambda sql: conn.execute(sql).fetchone()[0]  # noqa: E731
    return {
        "documents": one("SELECT COUNT(*) FROM documents WHERE kind='source'"),
        "chunks": one("SELECT COUNT(*) FROM chunks c JOIN documents d ON d.id=c.doc_id WHERE d.kind='source'"),
        "units_active": one("SELECT COUNT(*) FROM documents WHERE kind='unit' AND status='active'"),
        "units_inactive": one("SELECT COUNT(*) FROM documents WHERE kind='unit' AND status!='active'"),
        "queries": one("SELECT COUNT(*) FROM queries"),
        "feedback": one("SELECT COUNT(*) FROM feedback"),
        "runs": one("SELECT COUNT(*) FROM runs"),
    }


def get_meta(conn, key, default=None):
    row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return row[0] if row else default


def set_meta(conn, key, value):
    conn.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                 (key, str(value)))


class Connections:
    """One connection per thread: sqlite3 connections must not be shared across threads mid-statement."""

    def __init__(self, path, readonly=False):
        self.path, self.readonly = path, readonly
        self._local = threading.local()
        self._all = []
        self._lock = threading.Lock()

    def get(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, self.readonly)
            self._local.conn = conn
            self._local.records = Records(conn)
            with self._lock:
                self._all.append(conn)
        return conn

    def records(self):
        """This thread's connection as the indexes read it."""
        self.get()
        return self._local.records

    def close(self):
        with self._lock:
            for conn in self._all:
                try:
                    conn.close()
                except Exception:
                    pass
            self._all.clear()
        self._local = threading.local()


def now():
    return time.time()


from .records import Records  # noqa: E402  (it reads the change log, which uses the helpers above)
