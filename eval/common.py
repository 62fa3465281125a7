"""What the eval scripts share: the repository root on sys.path, offline models, the datasets folder,
timestamped progress lines, the command line that each result file starts with, and writing that file."""

import os
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "datasets"))
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:7.0f}s] {msg}", file=sys.stderr, flush=True)


def command_line():
    """The command as typed from the repository root (the venv's python shown relative to it)."""
    rel = os.path.relpath(sys.executable, ROOT)
    return " ".join(shlex.quote(a) for a in [sys.executable if rel.startswith("..") else rel] + sys.argv)


def write_result(text, out=None):
    """Print a result (markdown) and, with `out`, write it there too."""
    print(text)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
