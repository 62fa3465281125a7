"""Turn paths (files, folders, stdin) into document records; each file is read whole or rejected whole."""

import csv
import fnmatch
import importlib.util
import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable
from html.parser import HTMLParser



@dataclass
class Record:
    id: str
    text: str
    title: str = ""
    source: str = ""
    meta: dict = field(default_factory=dict)


@dataclass
class IngestReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    chunks: int = 0
    skipped: list = field(default_factory=list)  # Problem
    deleted: int = 0        # by a sync: documents whose files are gone
    truncated: int = 0      # chunks longer than the embedding model's window (their ends are not embedded)
    dry_run: bool = False   # nothing was written: the counts say what would be

    @property
    def errors(self):
        return [p for p in self.skipped if p.error]

    def to_dict(self) -> dict:
        """Counts and the skipped files with their reasons (what `wbrag ingest --json` and HTTP return)."""
        return {"added": self.added, "updated": self.updated, "unchanged": self.unchanged, "chunks": self.chunks,
                "deleted": self.deleted, "truncated": self.truncated, "dry_run": self.dry_run,
                "skipped": [{"where": p.where, "reason": p.reason, "error": p.error} for p in self.skipped]}

    def summary(self):
        s = ("would have: " if self.dry_run else "") + \
            f"added {self.added}, updated {self.updated}, unchanged {self.unchanged}, skipped {len(self.skipped)}"
        if self.deleted:
            s += f", deleted {self.deleted}"
        if self.dry_run:
            return s
        cut = f", {self.truncated} longer than the model's window: their ends are not embedded" if self.truncated else ""
        return s + f" ({self.chunks} chunks embedded{cut})"


@dataclass
class Problem:
    """A file (and line) that was skipped, with the reason; `error` ones make the exit code non-zero."""

    where: str
    reason: str
    error: bool = True

    def __str__(self):
        return f"{self.where}: {self.reason}"


class _HTMLText(HTMLParser):
    SKIP = {"script", "style", "noscript", "template", "head", "nav", "header", "footer", "aside"}
    BLOCK = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "section", "article", "pre"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.title, self._skip, self._in_title = [], "", 0, False

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self._in_title = True
        elif tag in self.SKIP:
            self._skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag in self.SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        elif not self._skip:
            self.parts.append(data)


def html_to_text(html):
    p = _HTMLText()
    p.feed(html)
    p.close()
    text = "".join(p.parts)
    paras = [" ".join(x.split()) for x in text.split("\n\n")]
    return " ".join(p.title.split()), "\n\n".join(x for x in paras if x)


_BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xff\xfe", "utf-16"),
         (b"\xfe\xff", "utf-16"))


def _decode(raw, where, encoding=None):
    """Text from bytes: the given encoding, else a BOM's (UTF-16/32), else UTF-8, else Windows-1252 (the
    common 8-bit encoding of Western text; Latin-1 files decode the same)."""
    if encoding:
        try:
            return raw.decode(encoding)
        except LookupError:
            raise ValueError(f"unknown encoding {encoding!r}; use a Python codec name such as latin-1") from None
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise ValueError(f"line {line}: not valid {encoding} at byte {e.start}; give the file's encoding "
                             "with --encoding, or leave it out to detect it") from None
    for bom, codec in _BOMS:  # UTF-16/32 text (Windows tools write it) has NUL bytes but is not binary
        if raw.startswith(bom):
            try:
                return raw.decode(codec)
            except UnicodeDecodeError as e:
                raise ValueError(f"invalid {codec.upper()} at byte {e.start}; re-save the file as UTF-8") from None
    if b"\0" in raw[:8192]:
        raise ValueError("binary file (NUL bytes); only text formats are ingested")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # the five bytes cp1252 leaves undefined


# the field names of common shapes (BEIR: _id/title/text; Pyserini: id/contents; ...), tried in order
# when the configured field is absent
ID_FIELDS = ("_id", "docid", "doc_id")
TITLE_FIELDS = ("name", "heading")
TEXT_FIELDS = ("text", "contents", "content", "body", "passage", "abstract")


def _pick(obj, configured, fallbacks):
    return configured if configured in obj else next((f for f in fallbacks if f in obj), None)


def _field_record(obj, fields, where, source):
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    text_f = _pick(obj, fields["text_field"], TEXT_FIELDS)
    if text_f is None or not isinstance(obj.get(text_f), str):
        raise ValueError(f"{where}: no text field {fields['text_field']!r} (nor {', '.join(TEXT_FIELDS)}); "
                         "name the field that holds the text (text_field)")
    id_f = _pick(obj, fields["id_field"], ID_FIELDS)
    rid = obj.get(id_f) if id_f else None
    if rid is None or str(rid).strip() == "":
        raise ValueError(f"{where}: no id field {fields['id_field']!r} (nor {', '.join(ID_FIELDS)}); name the "
                         "field that holds the id (id_field)")
    title_f = _pick(obj, fields["title_field"], TITLE_FIELDS)
    title = (obj.get(title_f) if title_f else "") or ""
    known = {id_f, title_f, text_f}
    meta = {k: v for k, v in obj.items() if k not in known and isinstance(v, (str, int, float, bool))}
    if isinstance(obj.get("metadata"), dict):
        meta.update({k: v for k, v in obj["metadata"].items() if isinstance(v, (str, int, float, bool))})
    return Record(id=str(rid), title=str(title), text=obj[text_f], source=source, meta=meta)


# ---- loaders, registered by file type ------------------------------------------------------------
# A loader turns one file into records: text loaders get the decoded text, binary ones the bytes. Each is
# registered once, by extension, here; the formats an optional extra adds say which extra they need.

@dataclass
class Loader:
    name: str
    read: Callable
    binary: bool = False
    extra: str | None = None  # the pip extra its packages come from

    def available(self):
        return self.extra is None or all(importlib.util.find_spec(m) for m in EXTRA_MODULES[self.extra])


LOADERS: dict[str, Loader] = {}
EXTRA_MODULES = {"docs": ("markitdown", "pypdfium2")}


def register_loader(*exts, name, binary=False, extra=None):
    def deco(fn):
        for ext in exts:
            LOADERS[ext] = Loader(name, fn, binary, extra)
        return fn
    return deco


def loader_for(path):
    """The loader of a file, by extension (man pages by section number); None when unsupported."""
    name = os.path.basename(path).lower()
    ext = os.path.splitext(name)[1]
    if ext in LOADERS:
        return LOADERS[ext]
    if re.fullmatch(r"\.[1-9][a-z]*", ext or ""):
        return LOADERS[".man"]
    if not ext:
        return LOADERS[""]
    return None


def formats():
    """'.ext (name)' for every registered type, those of missing extras marked: for --help and errors."""
    by_name = {}
    for ext, ld in sorted(LOADERS.items()):
        if ext:
            by_name.setdefault((ld.name, ld.extra), []).append(ext)
    return ", ".join(f"{' '.join(exts)}" + (f" [{extra}]" if extra else "") for (name, extra), exts in by_name.items())


def parse_text(content, path, doc_id, fields):
    """Records from one file's decoded content (by its extension); raises ValueError naming the line."""
    if path == "-":  # stdin: JSONL when it starts like it, else one plain-text document
        return _jsonl(content, path, doc_id, fields) if content.lstrip().startswith("{") else \
            _text(content, "stdin.txt", doc_id, fields)
    ld = loader_for(path) or LOADERS[".txt"]
    return ld.read(content, path, doc_id, fields)


@register_loader(".jsonl", ".ndjson", name="JSON lines")
def _jsonl(content, path, doc_id, fields):
    out = []
    for n, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ValueError(f"line {n}: malformed JSON ({e.msg}); fix or remove the line") from None
        out.append(_field_record(obj, fields, f"line {n}", path))
    return out


@register_loader(".json", name="JSON")
def _json(content, path, doc_id, fields):
    try:
        data = json.loads(content)
    except ValueError as e:
        raise ValueError(f"line {e.lineno}: malformed JSON ({e.msg})") from None
    items = data if isinstance(data, list) else [data]
    return [_field_record(o, fields, f"record {i}", path) for i, o in enumerate(items, 1)]


@register_loader(".csv", ".tsv", name="CSV")
def _csv(content, path, doc_id, fields):
    reader = csv.DictReader(io.StringIO(content), dialect="excel-tab" if path.lower().endswith(".tsv") else "excel")
    header = {h: True for h in reader.fieldnames or ()}
    text_f = _pick(header, fields["text_field"], TEXT_FIELDS)
    if text_f is None:
        raise ValueError(f"line 1: no column {fields['text_field']!r} (nor {', '.join(TEXT_FIELDS)}) in the header; "
                         "name the column that holds the text (text_field)")
    id_f, title_f = _pick(header, fields["id_field"], ID_FIELDS), _pick(header, fields["title_field"], TITLE_FIELDS)
    out = []
    for n, row in enumerate(reader, 2):
        rid = (row.get(id_f) if id_f else None) or f"{doc_id}#{n - 1}"
        meta = {k: v for k, v in row.items() if k not in (id_f, title_f, text_f) and k}
        out.append(Record(id=rid, title=(row.get(title_f) if title_f else "") or "", text=row[text_f] or "",
                          source=path, meta=meta))
    return out


@register_loader(".html", ".htm", ".xhtml", name="HTML")
def _html(content, path, doc_id, fields):
    title, text = html_to_text(content)
    return [Record(id=doc_id, title=title, text=text, source=path)]


@register_loader(".txt", ".text", ".md", ".markdown", "", name="text and Markdown")
def _text(content, path, doc_id, fields):
    """The title: an ATX (# Title) or setext (Title / =====) heading on top, or a short first line."""
    if not os.path.splitext(path)[1] and re.match(r"\.(TH|Dd|\\\")", content.lstrip()):
        return _man(content, path, doc_id, fields)  # an extensionless roff page
    lines = content.strip().splitlines()
    title = ""
    if len(lines) > 1 and lines[0].strip() and re.fullmatch(r"(=+|-+|~+|\^+|\*+|#+)\s*", lines[1]):
        title, lines = lines[0].strip(), lines[2:]
    elif lines and (lines[0].startswith("#") or (len(lines) > 1 and len(lines[0]) < 120 and not lines[1].strip())):
        title, lines = lines[0].lstrip("#").strip(), lines[1:]
    return [Record(id=doc_id, title=title, text="\n".join(lines).strip(), source=path)]


@register_loader(".rst", ".rest", name="reStructuredText")
def _rst(content, path, doc_id, fields):
    lines = content.strip().splitlines()
    if len(lines) > 2 and re.fullmatch(r"([=\-~^*#\"'`+])\1+", lines[0].strip()) and lines[2].strip() == lines[0].strip():
        lines = lines[1:2] + lines[3:]  # an overlined title: drop the overline, keep title + text
    recs = _text("\n".join(lines), path + ".txt", doc_id, fields)
    for r in recs:  # directives and roles are markup, not text
        r.text = re.sub(r"^\.\. [^\n]*$", "", r.text, flags=re.M)
        r.text = re.sub(r":[a-z]+:`([^`]*)`", r"\1", r.text).replace("``", "")
        r.source = path
    return recs


@register_loader(".man", ".roff", name="man pages (roff)")
def _man(content, path, doc_id, fields):
    """The page's name and summary (NAME section) as title; roff requests and font escapes removed."""
    title, out, section = "", [], ""
    for line in content.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        m = re.match(r"\.(SH|SS)\s+\"?([^\"]*)\"?", line)
        if m:
            section = m.group(2).strip().upper()
            out.append("\n" + m.group(2).strip().title() + "\n")
            continue
        if line.startswith("."):
            m = re.match(r"\.(B|I|BI|BR|IR|RB|RI|IB)\s+(.*)", line)
            if not m:
                continue
            line = re.sub(r'"', "", m.group(2))
        line = re.sub(r"\\f[BIRP]|\\f\(..|\\s[+-]?\d+|\\&|\\e", "", line).replace("\\-", "-").replace("\\(em", "-")
        line = " ".join(line.split())
        if section == "NAME" and line and not title:
            title = line
        out.append(line)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()
    return [Record(id=doc_id, title=title, text=text, source=path)]


@register_loader(".gz", name="gzip-compressed text", binary=True)
def _gz(raw, path, doc_id, fields, encoding=None):
    """The file inside, by its own name (notes.txt.gz, ls.1.gz)."""
    import gzip

    try:
        inner = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise ValueError(f"not a valid gzip file ({e}); re-compress it or ingest the plain file") from None
    inner_path = path[:-3]
    ld = loader_for(inner_path) or LOADERS[".txt"]
    if ld.binary:
        return ld.read(inner, inner_path, doc_id, fields)
    recs = ld.read(_decode(inner, inner_path, encoding), inner_path, doc_id, fields)
    for r in recs:
        r.source = path
    return recs


@register_loader(".pdf", name="PDF", binary=True, extra="docs")
def _pdf(raw, path, doc_id, fields, encoding=None):
    """One record per page (id FILE#page=N, meta page and file) with pypdfium2: a hit cites its page."""
    import pypdfium2 as pdfium

    try:
        pdf = pdfium.PdfDocument(raw)
    except pdfium.PdfiumError as e:
        raise ValueError(f"cannot read the PDF ({e}); is it encrypted or damaged?") from None
    name = os.path.splitext(os.path.basename(path))[0]
    out = []
    try:
        for n in range(len(pdf)):
            page = pdf[n]
            text = page.get_textpage().get_text_range().replace("\r\n", "\n").strip()
            if text:
                title = next((ln.strip() for ln in text.splitlines() if ln.strip()), name)[:200]
                out.append(Record(id=f"{doc_id}#page={n + 1}", title=title, text=text, source=path,
                                  meta={"page": n + 1, "file": doc_id}))
    finally:
        pdf.close()
    return out


def _markitdown(raw, path):
    ext = os.path.splitext(path)[1].lower()
    if not raw.startswith(b"PK\x03\x04"):  # DOCX, PPTX, XLSX and EPUB are zip archives
        raise ValueError(f"not a valid {ext} file (not a zip archive); is it damaged or misnamed?")
    from markitdown import MarkItDown, StreamInfo

    try:
        return MarkItDown().convert_stream(io.BytesIO(raw), stream_info=StreamInfo(
            extension=os.path.splitext(path)[1].lower(), filename=os.path.basename(path))).text_content or ""
    except Exception as e:  # converters raise their own types for damaged files
        raise ValueError(f"cannot convert ({e.__class__.__name__}: {str(e)[:120]}); is the file damaged?") from None


@register_loader(".docx", ".xlsx", ".epub", name="Office and e-book files", binary=True, extra="docs")
def _office(raw, path, doc_id, fields, encoding=None):
    recs = _text(_markitdown(raw, path), path + ".md", doc_id, fields)
    for r in recs:
        r.source = path
    return recs


@register_loader(".pptx", name="PowerPoint", binary=True, extra="docs")
def _pptx(raw, path, doc_id, fields, encoding=None):
    """One record per slide (id FILE#slide=N, meta slide and file)."""
    md = _markitdown(raw, path)
    parts = re.split(r"<!-- Slide number: (\d+) -->", md)
    out = []
    for i in range(1, len(parts) - 1, 2):
        n, body = int(parts[i]), parts[i + 1].strip()
        if body:
            rec = _text(body, path + ".md", doc_id, fields)[0]
            out.append(Record(id=f"{doc_id}#slide={n}", title=rec.title, text=rec.text or rec.title, source=path,
                              meta={"slide": n, "file": doc_id}))
    return out


def iter_files(path, errors=None):
    """(file, id) pairs: a folder recursively, ids relative to it; a file alone, its name.
    Folders that cannot be listed are appended to `errors` as OSError."""
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path, onerror=(errors.append if errors is not None else None)):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                full = os.path.join(root, name)
                yield full, os.path.relpath(full, path).replace(os.sep, "/")
    else:
        yield path, os.path.basename(path)


def is_beir(folder):
    """A BEIR dataset folder (corpus.jsonl beside queries and qrels/): only its corpus is documents."""
    return os.path.isfile(os.path.join(folder, "corpus.jsonl")) and os.path.isdir(os.path.join(folder, "qrels"))


def mapping(sources, rel_id, fields, encoding):
    """(fields, encoding) for one file: the first [[ingest.sources]] entry whose glob matches its path
    relative to the folder ingested, or its name; else the defaults."""
    name = rel_id.rsplit("/", 1)[-1]
    for src in sources or ():
        if fnmatch.fnmatch(rel_id, src["glob"]) or fnmatch.fnmatch(name, src["glob"]):
            return ({**fields, **{k: v for k, v in src.items() if k.endswith("_field")}},
                    src.get("encoding", encoding))
    return fields, encoding


def estimate(paths):
    """How many records `paths` hold, cheaply (a line count for JSONL/CSV, one per other file), for a
    progress total; None when unknowable (stdin)."""
    n = 0
    for path in paths:
        if path == "-":
            return None
        if os.path.isdir(path) and is_beir(path):
            path = os.path.join(path, "corpus.jsonl")
        for full, _ in iter_files(path):
            ext = os.path.splitext(full)[1].lower()
            if ext in (".jsonl", ".ndjson", ".csv", ".tsv"):
                try:
                    with open(full, "rb") as f:
                        lines = sum(1 for line in f if line.strip())
                except OSError:
                    lines = 1
                n += max(lines - (ext in (".csv", ".tsv")), 0)
            else:
                n += 1
    return n


def read_paths(paths, fields, max_bytes, stdin=None, encoding=None, root=None, sources=()):
    """Yield Record or Problem for everything under `paths`; raises nothing for bad files.
    `encoding`: of every text file (default: detected); `root`: ids are paths relative to it (a source's
    root), whatever path was typed, so the same file keeps its id; `sources`: per-file mappings."""
    for path in paths:
        if path != "-" and os.path.isdir(path) and is_beir(path):
            path = os.path.join(path, "corpus.jsonl")
        if path == "-":
            content = (stdin or io.StringIO()).read()
            try:
                yield from parse_text(content, "-", "stdin", fields)
            except ValueError as e:
                yield Problem(f"<stdin>: {e}".split(": ", 1)[0], str(e))
            continue
        if not os.path.exists(path):
            yield Problem(path, "no such file or folder")
            continue
        found, walk_errors = False, []
        named = not os.path.isdir(path)
        for full, doc_id in iter_files(path, walk_errors):
            file_fields, file_encoding = mapping(sources, doc_id, fields, encoding)
            if root is not None:
                doc_id = os.path.relpath(os.path.abspath(full), os.path.abspath(root)).replace(os.sep, "/")
            ld = loader_for(full)
            if ld is None:  # an error when the file was named, a note when met in a folder
                ext = os.path.splitext(full)[1].lower()
                yield Problem(full, f"unsupported file type {ext!r}; supported: {formats()}", error=named)
                continue
            if not ld.available():
                yield Problem(full, f"{ld.name} needs the optional packages of writeback-rag[{ld.extra}]; "
                                    f"install them with: pip install 'writeback-rag[{ld.extra}]'")
                continue
            found = True
            try:
                size = os.path.getsize(full)
                if size > max_bytes:
                    yield Problem(full, f"file is {size / 1e6:.0f} MB, over the {max_bytes / 1e6:.0f} MB limit "
                                        "(setting ingest.max_doc_mb); split it or raise the limit")
                    continue
                with open(full, "rb") as f:
                    raw = f.read()
            except OSError as e:
                yield Problem(full, f"cannot read ({e.strerror}); check permissions")
                continue
            try:
                if ld.binary:
                    records = ld.read(raw, full, doc_id, file_fields, encoding=file_encoding)
                else:
                    content = _decode(raw, full, file_encoding)
                    if not content.strip():
                        yield Problem(full, "empty file", error=False)
                        continue
                    records = ld.read(content, full, doc_id, file_fields)
            except ValueError as e:
                yield Problem(full, str(e))
                continue
            if not records and ld.binary:
                yield Problem(full, "no text found (a scanned document needs OCR first)", error=False)
            for r in records:  # the file they came from, wherever the command ran: what sync compares
                r.source = os.path.abspath(full)
            yield from records
        for err in walk_errors:
            yield Problem(err.filename or path, f"cannot read folder ({err.strerror}); check permissions")
        if os.path.isdir(path) and not found and not walk_errors:
            yield Problem(path, f"folder has no supported files ({formats()})")
