"""Progress without a terminal (cron, pipes): a total and an ETA where the total is known, separate counts,
a periodic line and a final one; silent when not asked for."""

import io
import json

from writeback_rag import KnowledgeBase
from writeback_rag.progress import Progress


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_log_lines_with_total_eta_and_counts(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr("writeback_rag.progress.time.monotonic", clock)
    out = io.StringIO()
    p = Progress(total=100, desc="ingesting", unit="doc", every=30, stream=out)
    clock.t = 10
    p.update(20, embedded=15, skipped=5)
    assert out.getvalue() == ""  # not yet 30 s
    clock.t = 40
    p.update(20, embedded=20)
    assert out.getvalue() == ("ingesting: 40/100 doc (40%), 1.0 doc/s, ETA 1m00s, elapsed 0m40s, embedded 35, "
                              "skipped 5\n")
    p.update(70)  # past the estimate: the total grows
    p.close()
    assert out.getvalue().splitlines()[-1].startswith("ingesting: 110/110 doc (100%)")


def test_silent_unless_asked():
    out = io.StringIO()
    p = Progress(total=3, show=False, stream=out, every=0)
    p.update(3)
    p.close()
    assert out.getvalue() == ""


def test_ingest_reports_progress_with_a_total_when_not_a_terminal(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"id": f"d{i}", "text": f"note {i}"}) for i in range(30)) + "\n")
    (tmp_path / "e.txt").write_text("   ")
    kb = KnowledgeBase.create(tmp_path / "kb", embedder="hash", notify=lambda m: None)
    kb.ingest([str(data), str(tmp_path / "e.txt")], show_progress=True)
    kb.ingest([str(data)], show_progress=True)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("ingesting: 31/31 doc (100%)") and "embedded 30" in err[0] and "skipped 1" in err[0]
    assert err[1].startswith("ingesting: 30/30 doc (100%)") and "unchanged 30" in err[1]
    kb.close()
