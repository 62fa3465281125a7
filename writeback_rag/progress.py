"""Progress: a tqdm bar on a terminal; without one (cron, pipes, logs) a one-line report every 30 s and
at the end. Both show the total and an ETA wherever the total is known, and named counts (embedded,
unchanged, skipped, ...) beside the rate. The API passes show=False: silent."""

import sys
import time


class Progress:
    def __init__(self, total=None, show=True, desc="", unit="it", every=30.0, stream=None):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n, self.counts = 0, {}
        self.stream = stream or sys.stderr
        self.start = self.last = time.monotonic()
        self.bar = None
        self.on = bool(show)
        if self.on and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream)

    def update(self, n=1, **counts):
        """`n` more done; `counts` add to the named counts shown beside the rate."""
        self.n += n
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        if self.total is not None and self.n > self.total:  # an estimate that fell short (pages of a PDF)
            self.total = self.n
            if self.bar is not None:
                self.bar.total = self.total
        if self.bar is not None:
            self.bar.update(n)
            if self.counts:
                self.bar.set_postfix(self.counts, refresh=False)
        elif self.on and time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def line(self):
        """'DESC: N/TOTAL UNIT (P%), R UNIT/s, ETA T, name n, ...': one line for a log."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.n / elapsed
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"
                 + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        parts.append(f"{rate:.1f} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        parts.append(f"elapsed {_clock(elapsed)}")
        parts += [f"{k} {v}" for k, v in self.counts.items()]
        return ", ".join(parts)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.on and self.n:
            self.stream.write(self.line() + "\n")
            self.stream.flush()


def _clock(seconds):
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress(iterable, show, desc, total=None, **kw):
    """Iterate `iterable` with progress (see Progress), or a Progress to update by hand when it is None."""
    if iterable is None:
        return Progress(total=total, show=show, desc=desc, **kw)
    return _iterate(iterable, Progress(total=total if total is not None else _len(iterable), show=show,
                                       desc=desc, **kw))


def _iterate(iterable, p):
    try:
        for x in iterable:
            yield x
            p.update(1)
    finally:
        p.close()


def _len(iterable):
    try:
        return len(iterable)
    except TypeError:
        return None
