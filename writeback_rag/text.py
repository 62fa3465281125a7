"""Tokenizing, sentence splitting and chunking shared by ingest, BM25 and distillers."""

import hashlib
import re
import unicodedata

_WORD = re.compile(r"\w+", re.UNICODE)
_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_SENT = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")

_ABBREV = re.compile(r"(?:\b(?:Dr|Mr|Mrs|Ms|St|Prof|Sr|Jr|No|vs|etc|e\.g|i\.e|cf|Fig|al|Capt|Lt|Col|Gen|Rev|Mt)|\b[A-Z])\.$")

STOPWORDS = frozenset(
    "a an and are as at be been but by for from had has have he her his i if in into is it its "
    "of on or she so such that the their them then there these they this to was were which who "
    "will with what when where how why did does do not no".split()
)


def bm25_tokens(text):
    """Lower-cased word tokens without stopwords: the BM25 engine and the rank-bm25 reference share it."""
    return [t for t in _WORD.findall(text.lower()) if t not in STOPWORDS]


def index_text(title, text):
    """What a chunk is indexed as: its document's title names what it is about, so it goes with every chunk."""
    return f"{title}\n{text}" if title else text


def count_tokens(text):
    return len(_TOKEN.findall(text))


def normalize_answer(s):
    """SQuAD-style normalization: lower case, no punctuation, no articles, single spaces."""
    s = unicodedata.normalize("NFKC", s).lower()
    s = re.sub(r"[^\w\s]", " ", s)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def contains_answer(text, answers):
    norm = " " + normalize_answer(text) + " "
    return any(normalize_answer(a) and (" " + normalize_answer(a) + " ") in norm for a in answers)


def sentences(text):
    """Split on sentence ends followed by a capital or digit; keeps abbreviations mostly intact.
    Linear in the text: a sentence is built from a list of pieces, and only a piece's tail is checked."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if not para:
            continue
        cur = []  # pieces of the sentence being built: "Dr." ended no sentence
        for s in _SENT.split(para):
            s = s.strip()
            if not s:
                continue
            if cur and _ABBREV.search(cur[-1], max(0, len(cur[-1]) - 12)):
                cur.append(s)
            else:
                if cur:
                    out.append(" ".join(cur))
                cur = [s]
        if cur:
            out.append(" ".join(cur))
    return out


def chunk_text(text, size=200, overlap=40):
    """Token-budgeted chunks that end on sentence boundaries; a sentence over budget is cut by tokens."""
    pieces = []
    for sent in sentences(text):
        words = sent.split(" ")
        if count_tokens(sent) <= size:
            pieces.append(sent)
            continue
        buf, buf_len = [], 0
        for w in words:  # an over-long "sentence" (tables, lists): cut it by words
            buf.append(w)
            buf_len += count_tokens(w)  # tokens never span a space: the sum is the count of the joined text
            if buf_len >= size:
                pieces.append(" ".join(buf))
                buf, buf_len = [], 0
        if buf:
            pieces.append(" ".join(buf))
    chunks, cur, cur_len = [], [], 0
    lens = [count_tokens(p) for p in pieces]
    i = 0
    while i < len(pieces):
        if cur and cur_len + lens[i] > size:
            chunks.append(" ".join(cur))
            # carry trailing sentences up to `overlap` tokens into the next chunk
            back, back_len = [], 0
            for p in reversed(cur):
                lp = count_tokens(p)
                if back_len + lp > overlap or len(back) + 1 >= len(cur):
                    break
                back.insert(0, p)
                back_len += lp
            cur, cur_len = back, back_len
        cur.append(pieces[i])
        cur_len += lens[i]
        i += 1
    if cur:
        chunks.append(" ".join(cur))
    return chunks


def content_hash(*parts):
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def normalize_id(value):
    """Document ids are compared in Unicode NFC: 'café' typed or pasted in either form is one document."""
    return unicodedata.normalize("NFC", str(value))
