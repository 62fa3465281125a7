"""The files people have: a mixed folder (PDF, DOCX, PPTX, HTML, Markdown, reStructuredText, CSV, JSONL, a
man page, gzip, Latin-1 text), made here, ingests with exit 0 and every document searchable; page and
slide numbers travel with the hits; sync removes deleted files from every mode; ids do not depend on the
path typed."""

import gzip
import io
import json
import os
import zipfile

import pytest
from typer.testing import CliRunner

from writeback_rag import KnowledgeBase
from writeback_rag.cli import app

pytest.importorskip("markitdown")
pytest.importorskip("pypdfium2")
runner = CliRunner()


def make_pdf(pages):
    """A minimal PDF, one Helvetica text line per page."""
    objs = ["<< /Type /Catalog /Pages 2 0 R >>",
            "<< /Type /Pages /Kids [%s] /Count %d >>" % (" ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages))),
                                                       len(pages)),
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, text in enumerate(pages):
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET"
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                    f"/Contents {5 + 2 * i} 0 R >>")
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    out, offsets = io.BytesIO(), []
    out.write(b"%PDF-1.4\n")
    for n, body in enumerate(objs, 1):
        offsets.append(out.tell())
        out.write(f"{n} 0 obj\n{body}\nendobj\n".encode("latin-1"))
    xref = out.tell()
    out.write(f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode())
    for off in offsets:
        out.write(f"{off:010d} 00000 n \n".encode())
    out.write(f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode())
    return out.getvalue()


def make_docx(paragraphs):
    """A minimal Word document: the parts a reader needs, nothing else."""
    body = "".join(f"<w:p><w:r><w:t>{p}</w:t></w:r></w:p>" for p in paragraphs)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("[Content_Types].xml",
                   '<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/'
                   '2006/content-types"><Default Extension="rels" ContentType="application/vnd.openxmlformats-'
                   'package.relationships+xml"/><Default Extension="xml" ContentType="application/xml"/><Override '
                   'PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.'
                   'wordprocessingml.document.main+xml"/></Types>')
        z.writestr("_rels/.rels",
                   '<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/'
                   'package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/'
                   'officeDocument/2006/relationships/officeDocument" Target="word/document.xml"/></Relationships>')
        z.writestr("word/document.xml",
                   '<?xml version="1.0" encoding="UTF-8"?><w:document xmlns:w="http://schemas.openxmlformats.org/'
                   f'wordprocessingml/2006/main"><w:body>{body}</w:body></w:document>')
    return buf.getvalue()


def make_epub(title, paragraphs):
    """A minimal EPUB 3: container, package document, one chapter."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("mimetype", "application/epub+zip", compress_type=zipfile.ZIP_STORED)
        z.writestr("META-INF/container.xml",
                   '<?xml version="1.0"?><container version="1.0" xmlns="urn:oasis:names:tc:opendocument:xmlns:'
                   'container"><rootfiles><rootfile full-path="OEBPS/content.opf" media-type="application/oebps-'
                   'package+xml"/></rootfiles></container>')
        z.writestr("OEBPS/content.opf",
                   '<?xml version="1.0"?><package xmlns="http://www.idpf.org/2007/opf" version="3.0" unique-identifier='
                   '"id"><metadata xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:identifier id="id">x</dc:identifier>'
                   f'<dc:title>{title}</dc:title><dc:language>en</dc:language></metadata><manifest><item id="c1" '
                   'href="c1.xhtml" media-type="application/xhtml+xml"/></manifest><spine><itemref idref="c1"/>'
                   '</spine></package>')
        z.writestr("OEBPS/c1.xhtml", '<?xml version="1.0"?><html xmlns="http://www.w3.org/1999/xhtml"><head><title>'
                   f'{title}</title></head><body>' + "".join(f"<p>{p}</p>" for p in paragraphs) + "</body></html>")
    return buf.getvalue()


def make_pptx(path, slides):
    from pptx import Presentation

    prs = Presentation()
    for title, text in slides:
        slide = prs.slides.add_slide(prs.slide_layouts[1])
        slide.shapes.title.text = title
        slide.placeholders[1].text = text
    prs.save(path)


MAN = r""".\" a man page
.TH LAMPCTL 1 "2026" "lamp tools"
.SH NAME
lampctl \- control the zorbulite lamp rotation
.SH SYNOPSIS
.B lampctl
[\fB\-r\fR \fIRATE\fR]
.SH DESCRIPTION
\fBlampctl\fR sets the rotation of the zorbulite optic.
"""

EXPECT = {  # doc id -> a word only it holds
    "manual.pdf#page=1": "quillometer", "manual.pdf#page=2": "brassington",
    "report.docx": "marlinspike", "deck.pptx#slide=1": "fathomline", "deck.pptx#slide=2": "gunwhaler",
    "page.html": "lanternroof", "notes/setext.md": "foghornet", "guide.rst": "capstanbar", "k1": "wickerbasket",
    "k2": "oilcanister", "j1": "tidetable", "lampctl.1": "zorbulite", "old/letter.txt": "gardienne",
    "packed.txt.gz": "shinglebank", "book.epub": "sextantine", "stores.xlsx": "kerosinger"}


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "docs"
    (d / "notes").mkdir(parents=True)
    (d / "old").mkdir()
    (d / "manual.pdf").write_bytes(make_pdf(["Lamp manual: the quillometer measures oil.",
                                             "Page two: the brassington valve feeds the wick."]))
    (d / "report.docx").write_bytes(make_docx(["Annual report", "The marlinspike was replaced in spring."]))
    make_pptx(str(d / "deck.pptx"), [("Fog drill", "Sound the fathomline horn."),
                                     ("Boats", "Check the gunwhaler daily.")])
    (d / "page.html").write_text("<html><head><title>Lantern</title></head><body><nav>Home | Menu | Login</nav>"
                                 "<p>The lanternroof is painted red.</p><footer>Copyright</footer></body></html>")
    (d / "notes" / "setext.md").write_text("Fog signals\n===========\n\nThe foghornet sounds twice a minute.\n")
    (d / "guide.rst").write_text("=====\nGuide\n=====\n\nThe capstanbar turns the winch. See :ref:`winch`.\n\n"
                                 ".. note:: hidden directive\n")
    (d / "keepers.csv").write_text("id,title,text\nk1,Basket,A wickerbasket of tools.\nk2,Cans,An oilcanister "
                                   "by the door.\n")
    (d / "extra.jsonl").write_text(json.dumps({"id": "j1", "title": "Tides", "text": "The tidetable is posted."}) + "\n")
    (d / "lampctl.1").write_text(MAN)
    (d / "book.epub").write_bytes(make_epub("Light book", ["The sextantine chapter opens here."]))
    import openpyxl

    wb = openpyxl.Workbook()
    wb.active.append(["item", "note"])
    wb.active.append(["oil", "The kerosinger barrel is full."])
    wb.save(d / "stores.xlsx")
    (d / "old" / "letter.txt").write_bytes("Lettre\n\nLa gardienne allumait la lampe à l'aube.".encode("latin-1"))
    (d / "packed.txt.gz").write_bytes(gzip.compress(b"Packed note\n\nThe shinglebank shifted in the storm."))
    return d


def _kb(tmp_path):
    path = str(tmp_path / "kb")
    assert runner.invoke(app, ["init", "--kb", path, "--embedder", "hash"]).exit_code == 0
    return path


def test_mixed_folder_ingests_and_every_document_is_searchable(folder, tmp_path):
    path = _kb(tmp_path)
    r = runner.invoke(app, ["sync", "--kb", path, str(folder)])
    assert r.exit_code == 0, r.output
    kb = KnowledgeBase.open(path)
    ids = {r[0] for r in kb.conn.execute("SELECT id FROM documents")}
    assert ids == set(EXPECT), ids ^ set(EXPECT)
    for doc_id, word in EXPECT.items():
        for mode in ("bm25", "hybrid"):
            assert kb.search(word, k=1, mode=mode, log=False).hits[0].doc_id == doc_id, (mode, word)
        assert doc_id in [h.doc_id for h in kb.search(word, k=3, mode="dense", log=False).hits], word
    hit = kb.search("brassington valve", k=1, log=False).hits[0]
    assert hit.meta["page"] == 2 and hit.meta["file"] == "manual.pdf" and hit.source.endswith("manual.pdf")
    assert kb.search("gunwhaler", k=1, log=False).hits[0].meta["slide"] == 2
    assert kb.document("notes/setext.md")["title"] == "Fog signals"
    assert kb.document("lampctl.1")["title"].startswith("lampctl - control")
    assert "Home | Menu" not in kb.document("page.html")["text"]
    assert kb.document("guide.rst")["title"] == "Guide" and ":ref:" not in kb.document("guide.rst")["text"]
    assert "à l'aube" in kb.document("old/letter.txt")["text"]
    kb.close()


def test_sync_deletes_what_is_gone_in_every_mode_and_dry_run_writes_nothing(folder, tmp_path):
    path = _kb(tmp_path)
    assert runner.invoke(app, ["sync", "--kb", path, str(folder)]).exit_code == 0
    os.remove(folder / "manual.pdf")
    os.remove(folder / "keepers.csv")
    (folder / "extra.jsonl").write_text(json.dumps({"id": "j1", "title": "Tides", "text": "The tidetable moved."}) + "\n")
    r = runner.invoke(app, ["sync", "--kb", path, str(folder), "--dry-run", "--json"])
    plan = json.loads(r.output)
    assert r.exit_code == 0 and plan["dry_run"] and plan["deleted"] == 4 and plan["updated"] == 1
    kb = KnowledgeBase.open(path)
    assert kb.document("k1") is not None  # the dry run wrote nothing
    kb.close()
    r = runner.invoke(app, ["sync", "--kb", path, str(folder)])
    assert r.exit_code == 0 and "deleted 4" in r.output and "updated 1" in r.output
    kb = KnowledgeBase.open(path)
    for gone, word in (("manual.pdf#page=1", "quillometer"), ("manual.pdf#page=2", "brassington"),
                       ("k1", "wickerbasket"), ("k2", "oilcanister")):
        assert kb.document(gone) is None
        for mode in ("bm25", "dense", "hybrid"):
            assert gone not in {h.doc_id for h in kb.search(word, k=10, mode=mode, log=False).hits}
    assert kb.check()["ok"]
    kb.close()


def test_ids_are_relative_to_the_source_root_whatever_path_is_typed(folder, tmp_path):
    path = _kb(tmp_path)
    assert runner.invoke(app, ["sync", "--kb", path, str(folder)]).exit_code == 0
    r = runner.invoke(app, ["ingest", "--kb", path, str(folder / "notes")])
    assert r.exit_code == 0 and "unchanged 1" in r.output and "added 0" in r.output
    kb = KnowledgeBase.open(path)
    assert kb.stats()["documents"] == len(EXPECT)
    kb.close()


def test_sync_keeps_the_documents_of_a_file_it_cannot_read(folder, tmp_path):
    path = _kb(tmp_path)
    assert runner.invoke(app, ["sync", "--kb", path, str(folder)]).exit_code == 0
    (folder / "extra.jsonl").write_text('{"id": "j1", oops\n')
    r = runner.invoke(app, ["sync", "--kb", path, str(folder)])
    assert r.exit_code == 1 and "extra.jsonl" in r.output and "line 1: malformed JSON" in r.output
    kb = KnowledgeBase.open(path)
    assert kb.document("j1") is not None
    kb.close()


def test_one_command_for_a_folder_of_different_shapes(tmp_path):
    """A CSV, a Pyserini-style JSONL and a JSON with their own field names ingest cleanly in one command:
    common shapes are detected, and [[ingest.sources]] maps the rest; a BEIR folder gives its corpus only."""
    d = tmp_path / "mixed"
    (d / "faq").mkdir(parents=True)
    (d / "faq" / "faq.csv").write_text("q,answer\nhow-to-light,Strike the match below the wick.\n")
    (d / "pyserini.jsonl").write_text(json.dumps({"docid": "p1", "contents": "The jetty lamp burns colza."}) + "\n")
    (d / "notes.json").write_text(json.dumps([{"key": "n1", "headline": "Gulls", "body": "Gulls nest on the rock."}]))
    path = _kb(tmp_path)
    r = runner.invoke(app, ["config", "--kb", path,
                            'ingest.sources=[{glob = "faq/*.csv", id_field = "q", text_field = "answer"}, '
                            '{glob = "notes.json", id_field = "key", title_field = "headline"}]'])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["ingest", "--kb", path, str(d)])
    assert r.exit_code == 0 and "added 3" in r.output and "skipped 0" in r.output, r.output
    kb = KnowledgeBase.open(path)
    assert kb.document("how-to-light")["text"] == "Strike the match below the wick."
    assert kb.document("p1")["text"] == "The jetty lamp burns colza."
    assert kb.document("n1")["title"] == "Gulls"
    kb.close()
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text(json.dumps({"_id": "c1", "title": "T", "text": "Corpus text."}) + "\n")
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "a question"}) + "\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tc1\t1\n")
    r = runner.invoke(app, ["ingest", "--kb", path, str(beir)])
    assert r.exit_code == 0 and "added 1" in r.output, r.output
