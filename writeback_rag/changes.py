"""The change log: every committed change to the indexed chunks, numbered in commit order.

A writer fills a Change inside its write transaction and records it there, so the log can never disagree
with the documents. Each derived index remembers the sequence number it has applied and catches up by
replaying the log from there: its own process's commits and other processes' alike. The sequence number
of the newest change is also the KB's generation."""

import numpy as np

from . import store

_BATCH = 500  # ids per IN (...) list: under SQLite's host-parameter limit


class Change:
    """What one write transaction does to the indexed chunks."""

    def __init__(self):
        self.added, self.removed, self.removed_postings = [], [], []
        self.reset = False

    def add(self, chunk_ids):
        """Chunks that became searchable (their postings are written by the caller)."""
        self.added.extend(int(c) for c in chunk_ids)

    def remove(self, conn, chunk_ids):
        """Take chunks out of the sparse index now. Their postings go into the log with the change, so an
        engine that replays it can lower the document frequencies of exactly those terms."""
        ids = [int(c) for c in chunk_ids]
        for start in range(0, len(ids), _BATCH):
            part = ids[start:start + _BATCH]
            marks = ",".join("?" * len(part))
            self.removed_postings += conn.execute(
                f"SELECT term_id, chunk_id, tf FROM postings WHERE chunk_id IN ({marks})", part).fetchall()
            conn.execute(f"DELETE FROM postings WHERE chunk_id IN ({marks})", part)
        self.removed.extend(ids)

    def rebuild_all(self):
        """Every index must be rebuilt from the store (reindex)."""
        self.reset = True

    def __bool__(self):
        return bool(self.added or self.removed or self.reset)


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
