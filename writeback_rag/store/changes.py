"""The change log: every committed change to the indexed chunks, numbered in commit order.

A writer fills a Change inside its write transaction and records it there, so the log can never disagree
with the documents. Each derived index remembers the sequence number it has applied and catches up by
replaying the log from there: its own process's commits and other processes' alike. The sequence number
of the newest change is also the KB's generation.

Postings are not stored: an index tokenizes the chunks it adds (text.bm25_tokens is deterministic). The
store keeps the term dictionary (ids shared by every process) with each term's document frequency over the
active source chunks, which write-back's distiller needs without loading an index. A removed chunk's
(term id, tf) rows go into the log, so an engine that replays it lowers exactly those frequencies."""

from collections import Counter

import numpy as np

from .. import store
from ..text import bm25_tokens, index_text

_BATCH = 500  # ids per IN (...) list: under SQLite's host-parameter limit


class Change:
    """What one write transaction does to the indexed chunks. `terms`: a term -> id cache the caller keeps
    (and drops when its transaction rolls back)."""

    def __init__(self, terms=None):
        self.added, self.removed, self.removed_postings = [], [], []
        self.reset = False
        self.terms = {} if terms is None else terms

    def add(self, conn, chunks):
        """Chunks that became searchable: (chunk id, indexed text, document kind) each. Registers their
        terms (each index counts lengths itself, from the text)."""
        counts = [Counter(bm25_tokens(text)) for _, text, _ in chunks]
        ids = term_ids(conn, self.terms, {t for c in counts for t in c}, create=True)
        df = Counter(t for c, (_, _, kind) in zip(counts, chunks) if kind == "source" for t in c)
        if df:
            conn.executemany("UPDATE terms SET df=df+? WHERE id=?", [(n, ids[t]) for t, n in df.items()])
        self.added.extend(int(c[0]) for c in chunks)

    def remove(self, conn, chunk_ids):
        """Chunks that leave the indexes (call it before their rows or status change). Only chunks of
        active documents are indexed, so only theirs have postings to log."""
        ids = [int(c) for c in chunk_ids]
        rows = active_rows(conn, "SELECT c.id, c.text, d.title, d.kind FROM chunks c JOIN documents d "
                                 "ON d.id=c.doc_id WHERE d.status='active' AND c.id IN", ids)
        counts = [Counter(bm25_tokens(index_text(r[2], r[1]))) for r in rows]
        tids = term_ids(conn, self.terms, {t for c in counts for t in c}, create=True)
        df = Counter()
        for r, c in zip(rows, counts):
            self.removed_postings += [(tids[t], r[0], tf) for t, tf in c.items()]
            if r[3] == "source":
                df.update(c.keys())
        if df:
            conn.executemany("UPDATE terms SET df=df-? WHERE id=?", [(n, tids[t]) for t, n in df.items()])
        self.removed.extend(ids)

    def rebuild_all(self):
        """Every index must be rebuilt from the store (reindex)."""
        self.reset = True

    def __bool__(self):
        return bool(self.added or self.removed or self.reset)


def term_ids(conn, cache, terms, create=False):
    """{term: id} for `terms`, from `cache` or the store; `create` inserts the new ones (in the caller's
    transaction). Ids are never reused, so a cache stays right for as long as its transactions commit."""
    missing = [t for t in terms if t not in cache]
    if missing and create:
        conn.executemany("INSERT OR IGNORE INTO terms(term) VALUES (?)", [(t,) for t in missing])
    for start in range(0, len(missing), _BATCH):
        part = missing[start:start + _BATCH]
        cache.update(conn.execute(f"SELECT term, id FROM terms WHERE term IN ({','.join('?' * len(part))})",
                                  part).fetchall())
    return {t: cache[t] for t in terms if t in cache}


def recount_terms(conn):
    """Document frequencies from the chunks themselves (reindex)."""
    df = Counter()
    for text, title in conn.execute("SELECT c.text, d.title FROM chunks c JOIN documents d ON d.id=c.doc_id "
                                    "WHERE d.status='active' AND d.kind='source'"):
        df.update(set(bm25_tokens(index_text(title, text))))
    ids = term_ids(conn, {}, set(df), create=True)
    conn.execute("UPDATE terms SET df=0")
    conn.executemany("UPDATE terms SET df=? WHERE id=?", [(n, ids[t]) for t, n in df.items()])


def record(conn, change):
    """Append `change` inside the caller's write transaction; returns its sequence number."""
    post = np.array([tuple(r) for r in change.removed_postings], dtype=np.int64).reshape(-1, 3)
    cur = conn.execute("INSERT INTO changes(added, removed, removed_postings, reset) VALUES (?,?,?,?)",
                       (np.asarray(change.added, dtype=np.int64).tobytes(),
                        np.asarray(change.removed, dtype=np.int64).tobytes(), post.tobytes(), int(change.reset)))
    store.set_meta(conn, "generation", cur.lastrowid)
    return cur.lastrowid


def head(conn):
    """The sequence number of the newest committed change (0 for a new KB)."""
    return int(store.get_meta(conn, "generation", 0))


def since(conn, seq, upto):
    """Changes after `seq` up to `upto`, oldest first: (seq, added ids, removed ids, removed postings, reset)."""
    out = []
    for r in conn.execute("SELECT seq, added, removed, removed_postings, reset FROM changes WHERE seq>? AND seq<=? "
                          "ORDER BY seq", (int(seq), int(upto))):
        out.append((r[0], np.frombuffer(r[1], dtype=np.int64), np.frombuffer(r[2], dtype=np.int64),
                    np.frombuffer(r[3], dtype=np.int64).reshape(-1, 3), bool(r[4])))
    return out


def pending(conn, seq, upto):
    """(number of changes, chunks they touch) after `seq`: how far behind an index at `seq` is."""
    r = conn.execute("SELECT COUNT(*), COALESCE(SUM(length(added) + length(removed)), 0) / 8, MAX(reset) "
                     "FROM changes WHERE seq>? AND seq<=?", (int(seq), int(upto))).fetchone()
    return int(r[0]), int(r[1]), bool(r[2])


def active_rows(conn, sql_select, ids):
    """Rows of `sql_select` (which ends in 'c.id IN') for chunk ids of active documents, in batches."""
    ids = [int(i) for i in ids]
    out = []
    for start in range(0, len(ids), _BATCH):
        part = ids[start:start + _BATCH]
        out += conn.execute(f"{sql_select} ({','.join('?' * len(part))})", part).fetchall()
    return out
