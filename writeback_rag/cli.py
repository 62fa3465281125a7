"""wbrag: a thin CLI over the Python API; domain errors become one line and an exit code here only."""

import json
import os
import sys
import time
from typing import List, Optional

import typer
from typer.core import TyperGroup

from .errors import EmbedderMismatch, InputError, WbragError
from .kb import KnowledgeBase
from .loaders import formats


class _Group(TyperGroup):
    """The one place where domain exceptions turn into CLI errors."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except WbragError as e:
            typer.echo(f"wbrag: error: {e.render('cli')}", err=True)
            raise typer.Exit(e.exit_code)


app = typer.Typer(cls=_Group, no_args_is_help=True, add_completion=False,
                  help="writeback-rag: a retrieval knowledge base that improves from feedback.")
units_app = typer.Typer(cls=_Group, no_args_is_help=True, help="Inspect, retire and restore knowledge units.")
app.add_typer(units_app, name="units")

KB = typer.Option(None, "--kb", help="Knowledge-base folder [default: $WBRAG_KB or ./kb]")
JSON = typer.Option(False, "--json", help="Machine-readable output.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")
PRECISION = "fp32, bf16, or auto (bf16 on a CPU with native bf16 when it agrees with fp32)"


def _kb_path(kb):
    return kb or os.environ.get("WBRAG_KB") or "kb"


def _open(kb, embedder=None):
    return KnowledgeBase.open(_kb_path(kb), embedder=embedder)


def _dump(obj):
    typer.echo(json.dumps(obj, indent=2, default=str))


@app.command()
def init(kb: Optional[str] = KB,
         embedder: Optional[str] = typer.Option(None, help="Registered embedder (minilm, hash) or a local model "
                                                             "folder [default: embedder.name]."),
         dense_index: Optional[str] = typer.Option(None, help="flat (exact) or hnsw (large corpora) [default: dense.index]."),
         chunk_size: Optional[int] = typer.Option(None, help="Chunk size in tokens [default: chunking.size]."),
         chunk_overlap: Optional[int] = typer.Option(None, help="Overlap between chunks in tokens [default: chunking.overlap]."),
         precision: Optional[str] = typer.Option(None, help="Embedding precision: " + PRECISION + " [default: embedder.precision]."),
         backend: Optional[str] = typer.Option(None, help="Where the indexes live: embedded or milvus "
                                               "[default: index.backend]."),
         milvus_uri: Optional[str] = typer.Option(None, help="With --backend milvus: the server, e.g. "
                                                  "http://127.0.0.1:19530 (token: MILVUS_TOKEN).")):
    """Create a knowledge base folder."""
    given: dict[str, dict] = {"dense": {"index": dense_index}, "chunking": {"size": chunk_size, "overlap": chunk_overlap},
                              "embedder": {"precision": precision}, "index": {"backend": backend},
                              "milvus": {"uri": milvus_uri}}
    config = {s: {k: v for k, v in vals.items() if v is not None} for s, vals in given.items()}
    k = KnowledgeBase.create(_kb_path(kb), embedder=embedder, config=config)
    typer.echo(f"created knowledge base {k.path} (embedder {k.model_id})")


ENCODING = typer.Option(None, "--encoding", help="Encoding of the text files (e.g. latin-1) [default: detected: "
                                                    "BOM, UTF-8, else Windows-1252].")
FIELD_OPTIONS = dict(
    id_field=typer.Option(None, help="JSON/CSV field holding the id."),
    title_field=typer.Option(None, help="JSON/CSV field holding the title."),
    text_field=typer.Option(None, help="JSON/CSV field holding the text."))


def _report(report, as_json):
    for p in report.skipped:
        typer.echo(f"wbrag: {'error' if p.error else 'skipped'}: {p}", err=True)
    if as_json:
        _dump(report.to_dict())
    else:
        typer.echo(report.summary())
    if report.errors:
        nothing = not (report.added or report.updated or report.unchanged or report.deleted)
        raise typer.Exit(2 if nothing else 1)


@app.command(help="Add or update documents; unchanged ones are skipped by content hash. Formats: "
                  f"{formats()}; files in a folder of another type are noted and skipped. The [docs] extra "
                  "(pip install 'writeback-rag[docs]') adds PDF (a document per page), PPTX (per slide), DOCX, "
                  "XLSX and EPUB.")
def ingest(paths: List[str] = typer.Argument(..., help="Files, folders, or - for stdin (JSONL or text)."),
           kb: Optional[str] = KB, quiet: bool = QUIET, as_json: bool = JSON, encoding: Optional[str] = ENCODING,
           id_field: Optional[str] = FIELD_OPTIONS["id_field"], title_field: Optional[str] = FIELD_OPTIONS["title_field"],
           text_field: Optional[str] = FIELD_OPTIONS["text_field"]):
    fields = {k: v for k, v in (("id_field", id_field), ("title_field", title_field), ("text_field", text_field)) if v}
    with _open(kb) as k:
        report = k.ingest(paths, show_progress=not quiet, fields=fields, stdin=sys.stdin, encoding=encoding)
    _report(report, as_json)


@app.command()
def sync(folder: str, kb: Optional[str] = KB, dry_run: bool = typer.Option(False, "--dry-run", help="Say what would "
                                                                                                     "change; write nothing."),
         quiet: bool = QUIET, as_json: bool = JSON, encoding: Optional[str] = ENCODING,
         id_field: Optional[str] = FIELD_OPTIONS["id_field"], title_field: Optional[str] = FIELD_OPTIONS["title_field"],
         text_field: Optional[str] = FIELD_OPTIONS["text_field"]):
    """Make the KB match a folder: ingest new and changed files, delete documents whose files are gone (their
    units go stale). The folder becomes a source root: ids are relative to it, whatever path is typed later."""
    fields = {k: v for k, v in (("id_field", id_field), ("title_field", title_field), ("text_field", text_field)) if v}
    with _open(kb) as k:
        report = k.sync(folder, dry_run=dry_run, show_progress=not quiet, fields=fields, encoding=encoding)
    _report(report, as_json)


@app.command()
def delete(doc_ids: List[str], kb: Optional[str] = KB):
    """Remove documents from the database and both indexes."""
    with _open(kb) as k:
        n = k.delete(doc_ids)
    typer.echo(f"deleted {n} of {len(doc_ids)} documents")
    if n < len(doc_ids):
        raise typer.Exit(1)


def _filters(items):
    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        if "=" not in item or not key.strip():
            raise InputError(f"--filter {item!r}: expected KEY=VALUE (source=, doc=, kind=, or a metadata key)")
        out[key.strip()] = value.strip()
    return out


def _one_line(text):
    """Control characters (a newline in an id or a query) shown escaped: one record, one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _print_hits(hits, width=240):
    for h in hits:
        scores = ", ".join(f"{n} {v:.3f}" for n, v in (("bm25", h.bm25), ("dense", h.dense)) if v is not None)
        tag = " [unit]" if h.kind == "unit" else ""
        typer.echo(f"{h.rank}. {_one_line(h.doc_id)}{tag}  {_one_line(h.title)}  score {h.score:.4f} ({scores})")
        text = " ".join(h.text.split())
        typer.echo("   " + (text[:width] + ("..." if len(text) > width else "")))


@app.command()
def query(text: str, kb: Optional[str] = KB, k: int = typer.Option(5, "-k", help="Number of hits."),
          mode: Optional[str] = typer.Option(None, help="bm25 | dense | hybrid"),
          fusion: Optional[str] = typer.Option(None, help="rrf | weighted"),
          filter: Optional[List[str]] = typer.Option(None, "--filter", help="KEY=VALUE, repeatable."),
          units: bool = typer.Option(True, "--units/--no-units", help="Include knowledge units."),
          no_log: bool = typer.Option(False, "--no-log", help="Do not log this query."),
          as_json: bool = JSON):
    """Search; prints the query id that feedback refers to."""
    with _open(kb) as kbo:
        res = kbo.search(text, k=k, mode=mode, filters=_filters(filter), include_units=units, log=not no_log,
                         source="cli", fusion=fusion)
    if as_json:
        return _dump(res.to_dict())
    typer.echo(f"query {res.query_id if res.query_id is not None else '(not logged)'}  ({res.mode}, {res.latency_ms:.1f} ms)")
    _print_hits(res.hits)


@app.command()
def log(kb: Optional[str] = KB, last: int = typer.Option(20, "--last", help="How many queries."),
        source: Optional[str] = typer.Option(None, help="Only queries from cli | api | label."),
        as_json: bool = JSON):
    """List logged queries with their hits, feedback and gate decisions."""
    with _open(kb) as k:
        rows = k.queries(last=last, source=source)
    if as_json:
        return _dump(rows)
    for q in rows:
        fb = "".join("+" if f["correct"] else "-" for f in q["feedback"])
        gates = ",".join(f"{g['gate'][0]}{'+' if g['passed'] else '-'}" for g in q["gates"] if g["gate"] == "utility")
        top = _one_line(q["hits"][0]["doc_id"]) if q["hits"] else "-"
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(q["ts"]))
        typer.echo(f"{q['id']:>6}  {ts}  {q['source']:<5} {q['mode']:<6} k={q['k']:<3} {q['latency_ms']:.1f}ms  "
                   f"top={top}  fb={fb or '.'} {gates}  {_one_line(q['text'])[:70]}")


@app.command()
def stats(kb: Optional[str] = KB, as_json: bool = JSON):
    """Counts of documents, chunks, units, queries, feedback and runs."""
    with _open(kb) as k:
        s = k.stats()
    if as_json:
        return _dump(s)
    for key, v in s.items():
        typer.echo(f"{key:<16} {v}")


@app.command()
def check(kb: Optional[str] = KB, as_json: bool = JSON):
    """Compare every index with the records; exit 1 and say how to repair when one is wrong."""
    with _open(kb) as k:
        rep = k.check()
    if as_json:
        _dump(rep)
    else:
        for p in rep["problems"]:
            typer.echo(f"problem: {p.replace('reindex (CLI: wbrag reindex)', 'wbrag reindex')}")
        for n in rep["notes"]:
            typer.echo(f"note: {n}")
        typer.echo(("ok: " if rep["ok"] else "NOT ok: ") + ", ".join(f"{k} {v}" for k, v in rep["counts"].items()))
    if not rep["ok"]:
        raise typer.Exit(1)


@app.command()
def reindex(kb: Optional[str] = KB, re_embed: bool = typer.Option(False, help="Embed all chunks again."),
            embedder: Optional[str] = typer.Option(None, help="With --re-embed: switch to this embedder."),
            precision: Optional[str] = typer.Option(None, help="With --re-embed: embed in " + PRECISION + "."),
            backend: Optional[str] = typer.Option(None, help="Move the indexes to embedded or milvus (from the "
                                                  "stored vectors), then remove the old ones."),
            milvus_uri: Optional[str] = typer.Option(None, help="With --backend milvus: the server "
                                                     "[default: milvus.uri]."),
            quiet: bool = QUIET):
    """Rebuild the indexes from the database (no re-embedding unless --re-embed); --backend moves them."""
    from . import config as cfgmod
    from .kb import CONFIG_NAME

    if (embedder or precision) and not re_embed:
        raise InputError("--embedder and --precision need --re-embed (every chunk must be embedded again)")
    if precision:
        cfgmod.validate({"embedder": {"precision": precision}})  # a bad value: the setting's one-line error
    spec = {**({"name": embedder} if embedder else {}), **({"precision": precision} if precision else {})}
    path = _kb_path(kb)
    try:
        k = KnowledgeBase.open(path, embedder=spec or None)
    except EmbedderMismatch:
        if not (re_embed and spec):
            raise
        cfg = cfgmod.load(os.path.join(os.path.abspath(path), CONFIG_NAME))
        # a new model starts from its defaults; a new precision keeps the model and its other settings
        cfg["embedder"] = {"name": embedder, **spec} if embedder else {**cfg["embedder"], **spec}
        k = KnowledgeBase(os.path.abspath(path), cfg)
    with k:
        out = k.reindex(re_embed=re_embed, show_progress=not quiet, backend=backend, milvus_uri=milvus_uri)
    typer.echo(f"reindexed {out['chunks']} chunks (generation {out['generation']}, backend {out['backend']})")


@app.command("config")
def config_cmd(settings: List[str] = typer.Argument(None, help="SECTION.NAME=VALUE to change; SECTION.NAME alone "
                                                               "prints one value; none prints every setting."),
               kb: Optional[str] = KB):
    """Show or change the KB's config.toml (every key: docs/config.md), e.g. llm.backend=openai."""
    from . import config as cfgmod

    settings = settings or []
    reads = [s for s in settings if "=" not in s]
    if reads and (len(settings) > 1):
        raise InputError("give one SECTION.NAME to print it, or SECTION.NAME=VALUE pairs to change them")
    cfg = KnowledgeBase.configure(_kb_path(kb), [] if reads else settings)
    if reads:
        v = cfgmod.get(cfg, reads[0].strip())
        return typer.echo(v if isinstance(v, str) else cfgmod.toml_value(v))
    for section, values in cfg.items():
        for name, v in values.items():
            typer.echo(f"{section}.{name} = {cfgmod.toml_value(v)}")


@app.command()
def feedback(query_id: str, kb: Optional[str] = KB,
             correct: Optional[bool] = typer.Option(None, "--correct/--wrong", help="Was the answer right?"),
             doc: Optional[List[str]] = typer.Option(None, "--doc", help="Document that carried the answer (repeatable)."),
             answer: Optional[str] = typer.Option(None, help="The answer given or the right answer."),
             source: str = typer.Option("user", help="Who says so (user, app name, ...).")):
    """Record whether a logged query's answer was correct and which hits carried it."""
    if correct is None:
        raise InputError("say --correct or --wrong")
    with _open(kb) as k:
        fid = k.feedback(query_id, correct=correct, docs=doc or [], answer=answer, source=source)
        typer.echo(f"feedback {fid} recorded for query {query_id}")
        if not correct:  # say what it did to the units the answer used
            used = set(doc or [h["doc_id"] for h in k.query_record(query_id)["hits"]])
            limit = int(k.config["writeback"]["retire_after_wrong"])
            for u in k.units(ids=used):
                if u["status"] == "retired":
                    typer.echo(f"unit {u['id']} retired ({u['against']} wrong answers); "
                               f"restore it with: wbrag units restore {u['id']}")
                else:
                    typer.echo(f"unit {u['id']}: {u['against']} of {limit} wrong answers before it is retired")


@app.command()
def answer(question: str, kb: Optional[str] = KB, k: int = typer.Option(5, "-k"),
           mode: Optional[str] = typer.Option(None), as_json: bool = JSON):
    """Retrieve, then answer with the configured LLM (logged with the query)."""
    with _open(kb) as kbo:
        out = kbo.answer(question, k=k, mode=mode, source="cli")
    if as_json:
        return _dump({"query_id": out["query_id"], "answer": out["answer"], "hits": [h.to_dict() for h in out["hits"]]})
    typer.echo(f"query {out['query_id']}\n{out['answer']}\n")
    _print_hits(out["hits"], width=120)


@app.command()
def label(file: str, kb: Optional[str] = KB, split: str = typer.Option("train", help="Split (BEIR qrels/<split>.tsv or a 'split' field)."),
          k: Optional[int] = typer.Option(None, "-k"), mode: Optional[str] = typer.Option(None),
          quiet: bool = QUIET, as_json: bool = JSON):
    """Run a labelled set (JSONL or BEIR folder): retrieve, judge, store gate decisions and feedback."""
    with _open(kb) as kbo:
        rep = kbo.label(file, split=split, k=k, mode=mode, show_progress=not quiet)
    if as_json:
        return _dump(rep)
    typer.echo(f"labelled {rep['examples']} examples ({rep['judge']} judge): {rep['useful']} passed the utility gate, "
               f"{rep['docs_kept']} documents kept")


wb_app = typer.Typer(cls=_Group, help="Turn feedback into knowledge units (run nightly from cron).",
                     invoke_without_command=True)
app.add_typer(wb_app, name="writeback")


@wb_app.callback()
def writeback(ctx: typer.Context, kb: Optional[str] = KB,
              distiller: Optional[str] = typer.Option(None, help="extractive (default) or llm."),
              dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be written; write nothing."),
              quiet: bool = QUIET, as_json: bool = JSON):
    """Process feedback since the last run; `wbrag writeback rollback RUN_ID` undoes a run."""
    if ctx.invoked_subcommand is not None:
        return
    t0 = time.time()
    with _open(kb) as k:
        rep = k.writeback(distiller=distiller, dry_run=dry_run, show_progress=not quiet)
    if as_json:
        return _dump(rep)
    if dry_run:
        for u in rep["units"]:
            if "title" in u:
                typer.echo(f"would write {u['unit_id']} from {', '.join(u['sources'])}"
                           + (f" (replacing {', '.join(u['supersedes'])})" if u["supersedes"] else "") + f": {u['title']}")
    # one line per run, for cron logs
    typer.echo(f"writeback run={rep['run_id'] or 'dry-run'} distiller={rep['distiller']} examples={rep.get('examples', 0)} "
               f"{_run_counts(rep)} seconds={time.time() - t0:.1f}")
    t = rep["tuning"]
    line = f"learning: {t['status']}"
    if t.get("metrics"):
        now, new = t["metrics"]["current"], t["metrics"]["candidate"]
        line += (f" (held-out nDCG@10 hybrid {now['hybrid']:.3f} -> {new['hybrid']:.3f}, dense {now['dense']:.3f} -> "
                 f"{new['dense']:.3f}; {t['examples']} questions fitted, {t['holdout']} held out)")
    typer.echo(line + (f": {t['reason']}" if t["status"] != "adopted" else ""))
    u = rep["unit_use"]
    line = f"units: {u['status']}"
    if u.get("metrics"):
        line += " (held-out MRR@10 of the answer, or credit nDCG@10, without -> with units: " + ", ".join(
            f"{m} {v['without']:.3f} -> {v['with']:.3f}" for m, v in u["metrics"].items()) + f"; {u['holdout']} questions)"
    typer.echo(f"{line}: {u['reason']}")


def _run_counts(c):
    """A write-back run's counts, as the run's summary line and `wbrag runs` print them."""
    return (f"passed={c.get('passed_utility', 0)} docs={c.get('docs_kept', 0)} covered={c.get('covered', 0)} "
            f"held_out={c.get('held_out', 0)} "
            f"written={c.get('written', 0)} merged={c.get('merged', 0)} retired={c.get('retired', 0)} "
            f"rejected={c.get('rejected', 0)}")


@wb_app.command("rollback")
def writeback_rollback(run_id: str, kb: Optional[str] = KB):
    """Remove a run's units from the database and every index, and stop using what it learned."""
    with _open(kb) as k:
        n = k.rollback(run_id)
    typer.echo(f"rolled back run {run_id}: removed {n} units; its tuning (if any) is no longer used")


@app.command()
def tunings(kb: Optional[str] = KB, as_json: bool = JSON):
    """What write-back learned for retrieval (query adapter, fusion weights, rerankers), with the canary's verdicts."""
    with _open(kb) as k:
        rows = k.tunings()
    if as_json:
        return _dump(rows)
    if not rows:
        typer.echo("nothing learned yet: write-back fits retrieval once there is enough feedback")
    for r in rows:
        m = r["metrics"]
        typer.echo(f"{r['id']}  {r['status']:<11} adapter={'yes' if r['adapter'] else 'no'}{' (dense only)' if r['adapter'] and not r['hybrid_adapter'] else ''} "
                   f"bm25_weight={r['bm25_weight']:.1f} rrf_k={r['rrf_k']} rerankers={','.join(r['ranker']) or 'none'} "
                   f"cross_encoder={'yes' if r['cross_encoder'] else 'no'} fitted={r['examples']} held_out={r['holdout']} "
                   f"hybrid {m['current']['hybrid']:.3f}->{m['candidate']['hybrid']:.3f} "
                   f"dense {m['current']['dense']:.3f}->{m['candidate']['dense']:.3f}  {r['reason']}")


@app.command()
def runs(kb: Optional[str] = KB, as_json: bool = JSON):
    """List write-back runs with their counts."""
    with _open(kb) as k:
        rows = k.runs()
    if as_json:
        return _dump(rows)
    for r in rows:
        c = r["counts"]
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started"]))
        typer.echo(f"{r['id']}  {ts}  {r['status']:<11} seen={c.get('examples', 0)} {_run_counts(c)}"
                   + (f" tuning={c['tuning']}" if "tuning" in c else "")
                   + (f" units_off={','.join(c['unit_use']['off']) or '-'}"
                      if c.get("unit_use", {}).get("status") == "judged" else ""))


@units_app.command("list")
def units_list(kb: Optional[str] = KB, as_json: bool = JSON):
    """All knowledge units with status and sources."""
    with _open(kb) as k:
        rows = k.units()
    if as_json:
        return _dump(rows)
    for u in rows:
        typer.echo(f"{u['id']}  {u['status']:<10} {u['tokens']:>4} tok  from {', '.join(u['source_doc_ids'])}  "
                   f"q={u['query_ids']}  {u['title'][:60]}")


@units_app.command("show")
def units_show(unit_id: str, kb: Optional[str] = KB, as_json: bool = JSON):
    """One unit with its full provenance."""
    with _open(kb) as k:
        rows = k.units(ids=[unit_id])
    if not rows:
        raise InputError(f"unknown unit {unit_id!r}; list them with: wbrag units list")
    u = rows[0]
    if as_json:
        return _dump(u)
    for key in ("id", "status", "title", "text", "source_doc_ids", "source_chunk_ids", "query_ids", "feedback_ids",
                "distiller", "model", "run_id", "ended_by", "against"):
        typer.echo(f"{key}: {u[key]}")
    typer.echo(f"created: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(u['created']))}")


def _set_unit(kb, unit_id, method, now):
    with _open(kb) as k:
        before = getattr(k, method)(unit_id)
    typer.echo(f"unit {unit_id} {now} (was {before})")


@units_app.command("retire")
def units_retire(unit_id: str, kb: Optional[str] = KB):
    """Take one unit out of retrieval (until restored)."""
    _set_unit(kb, unit_id, "retire", "retired")


@units_app.command("restore")
def units_restore(unit_id: str, kb: Optional[str] = KB):
    """Return a retired or stale unit to retrieval."""
    _set_unit(kb, unit_id, "restore", "active again")


@app.command()
def serve(kb: Optional[str] = KB, host: str = typer.Option("127.0.0.1", help="Address to bind; any but loopback "
                                                                            "needs --token."),
          port: int = typer.Option(8765, help="Port."),
          token: Optional[str] = typer.Option(None, envvar="WBRAG_TOKEN", help="Bearer token clients must send "
                                              "[env: WBRAG_TOKEN]."),
          cors_origin: Optional[List[str]] = typer.Option(None, "--cors-origin", help="Allow browser calls from "
                                                          "this origin (repeatable); CORS is off without it."),
          max_k: int = typer.Option(100, "--max-k", help="Largest k a request may ask for.")):
    """Serve the knowledge base over HTTP (search, feedback, answer, ingest, write-back jobs, units, runs, log,
    stats, check, and Dify's POST /retrieval); OpenAPI at /docs."""
    from .server import serve as run_server

    run_server(_kb_path(kb), host=host, port=port, token=token, cors_origins=tuple(cors_origin or ()), max_k=max_k)


@app.command()
def mcp(kb: Optional[str] = KB):
    """Serve the knowledge base to a local agent over MCP (stdio): tools search, feedback, answer, units."""
    from .mcp_server import serve as run_mcp

    run_mcp(_kb_path(kb))


from .eval import register_cli as _register_eval  # noqa: E402

_register_eval(app)


def main():
    app()


if __name__ == "__main__":
    main()
