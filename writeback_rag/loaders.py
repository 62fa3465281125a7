"""Turn paths (files, folders, stdin) into document records; each file is read whole or rejected whole."""

import csv
import io
import json
import os
from dataclasses import dataclass, field
from html.parser import HTMLParser

SUPPORTED = {".txt", ".md", ".markdown", ".html", ".htm", ".json", ".jsonl", ".csv"}


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

    @property
    def errors(self):
        return [p for p in self.skipped if p.error]

    def to_dict(self) -> dict:
        """Counts and the skipped files with their reasons (what `wbrag ingest --json` and HTTP return)."""
        return {"added": self.added, "updated": self.updated, "unchanged": self.unchanged, "chunks": self.chunks,
                "skipped": [{"where": p.where, "reason": p.reason, "error": p.error} for p in self.skipped]}

    def summary(self):
        s = f"added {self.added}, updated {self.updated}, unchanged {self.unchanged}, skipped {len(self.skipped)}"
        return s + f" ({self.chunks} chunks embedded)"


@dataclass
class Problem:
    """A file (and line) that was skipped, with the reason; `error` ones make the exit code non-zero."""

    where: str
    reason: str
    error: bool = True

    def __str__(self):
        return f"{self.where}: {self.reason}"


class _HTMLText(HTMLParser):
    SKIP = {"script", "style", "noscript", "template", "head"}
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


def _decode(raw, where):
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
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"line {line}: invalid UTF-8 at byte {e.start}; re-save the file as UTF-8") from None


def _field_record(obj, fields, where, source):
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    text_f = fields["text_field"] if fields["text_field"] in obj else ("text" if "text" in obj else None)
    if text_f is None or not isinstance(obj.get(text_f), str):
        raise ValueError(f"{where}: no text field {fields['text_field']!r}; name the field that holds the text (text_field)")
    rid = obj.get(fields["id_field"], obj.get("_id"))
    if rid is None or str(rid).strip() == "":
        raise ValueError(f"{where}: no id field {fields['id_field']!r} (or '_id'); name the field that holds the id (id_field)")
    title = obj.get(fields["title_field"]) or ""
    known = {fields["id_field"], "_id", fields["title_field"], text_f}
    meta = {k: v for k, v in obj.items() if k not in known and isinstance(v, (str, int, float, bool))}
    if isinstance(obj.get("metadata"), dict):
        meta.update({k: v for k, v in obj["metadata"].items() if isinstance(v, (str, int, float, bool))})
    return Record(id=str(rid), title=str(title), text=obj[text_f], source=source, meta=meta)


def parse_text(content, path, doc_id, fields):
    """Records from one file's decoded content; raises ValueError naming the line on bad input."""
    ext = os.path.splitext(path)[1].lower()
    if path == "-" and not content.lstrip().startswith("{"):  # plain text piped in: one document
        return parse_text(content, "stdin.txt", doc_id, fields)
    if ext in (".jsonl",) or path == "-":
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
    if ext == ".json":
        try:
            data = json.loads(content)
        except ValueError as e:
            raise ValueError(f"line {e.lineno}: malformed JSON ({e.msg})") from None
        items = data if isinstance(data, list) else [data]
        return [_field_record(o, fields, f"record {i}", path) for i, o in enumerate(items, 1)]
    if ext == ".csv":
        reader = csv.DictReader(io.StringIO(content))
        if not reader.fieldnames or fields["text_field"] not in reader.fieldnames:
            raise ValueError(f"line 1: no column {fields['text_field']!r} in the header; name the column that holds the text (text_field)")
        out = []
        for n, row in enumerate(reader, 2):
            rid = row.get(fields["id_field"]) or f"{doc_id}#{n - 1}"
            meta = {k: v for k, v in row.items() if k not in (fields["id_field"], fields["title_field"], fields["text_field"]) and k}
            out.append(Record(id=rid, title=row.get(fields["title_field"]) or "", text=row[fields["text_field"]] or "",
                              source=path, meta=meta))
        return out
    if ext in (".html", ".htm"):
        title, text = html_to_text(content)
        return [Record(id=doc_id, title=title, text=text, source=path)]
    # .txt / .md: a markdown heading or the first short line is the title
    lines = content.strip().splitlines()
    title = ""
    if lines and (lines[0].startswith("#") or (len(lines) > 1 and len(lines[0]) < 120 and not lines[1].strip())):
        title = lines[0].lstrip("#").strip()
        lines = lines[1:]
    return [Record(id=doc_id, title=title, text="\n".join(lines).strip(), source=path)]


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


def read_paths(paths, fields, max_bytes, stdin=None):
    """Yield Record or Problem for everything under `paths`; raises nothing for bad files."""
    for path in paths:
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
            ext = os.path.splitext(full)[1].lower()
            if ext not in SUPPORTED:  # an error when the file was named, a note when met in a folder
                yield Problem(full, f"unsupported file type {ext or '(none)'!r}; supported: "
                                    f"{', '.join(sorted(SUPPORTED))}", error=named)
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
                content = _decode(raw, full)
                if not content.strip():
                    yield Problem(full, "empty file", error=False)
                    continue
                records = parse_text(content, full, doc_id, fields)
            except ValueError as e:
                yield Problem(full, str(e))
                continue
            yield from records
        for err in walk_errors:
            yield Problem(err.filename or path, f"cannot read folder ({err.strerror}); check permissions")
        if os.path.isdir(path) and not found and not walk_errors:
            yield Problem(path, f"folder has no supported files ({', '.join(sorted(SUPPORTED))})")
