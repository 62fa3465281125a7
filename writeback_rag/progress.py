"""Progress bars: tqdm on a terminal when asked for, silent otherwise (cron logs, pipes, the API)."""

import sys


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def progress(iterable, show, desc, **kw):
    """tqdm when asked for and stderr is a terminal; otherwise silent."""
    if not show or not sys.stderr.isatty():
        return iterable if iterable is not None else _NoBar()
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, **kw)
