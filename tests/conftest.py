import functools
import inspect
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "corpora", "lighthouses")
QUESTIONS = os.path.join(ROOT, "corpora", "lighthouses-questions.jsonl")
DATASETS = os.path.join(os.path.dirname(ROOT), "shared", "datasets")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from writeback_rag import KnowledgeBase  # noqa: E402
from writeback_rag.backends import register_llm  # noqa: E402


@register_llm("scripted")
class ScriptedLLM:
    """Answers from a rule list: the first (substring -> reply) whose substring is in the prompt wins."""

    model_id = "scripted"
    rules = []
    calls = []

    def __init__(self, **_):
        pass

    def complete(self, messages, max_tokens=256, temperature=0.0):
        prompt = "\n".join(m["content"] for m in messages)
        ScriptedLLM.calls.append(prompt)
        for needle, reply in ScriptedLLM.rules:
            if needle in prompt:
                return reply(prompt) if callable(reply) else reply
        return "I do not know."


@pytest.fixture
def scripted():
    ScriptedLLM.rules = []
    ScriptedLLM.calls = []
    return ScriptedLLM


def pytest_generate_tests(metafunc):
    """A module that sets BACKENDS = [...] runs each of its tests that builds a KB once per index backend."""
    backends = getattr(metafunc.module, "BACKENDS", None)
    if backends and "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", backends, indirect=True)


@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory):
    """A real Milvus engine (milvus-lite's C++ server) on loopback for the whole run, or the server named by
    WBRAG_TEST_MILVUS_URI (a standalone or cluster Milvus)."""
    if os.environ.get("WBRAG_TEST_MILVUS_URI"):
        yield os.environ["WBRAG_TEST_MILVUS_URI"]
        return
    from writeback_rag.milvus import serve_local

    server, uri = serve_local(tmp_path_factory.mktemp("milvus") / "milvus.db")
    yield uri
    server.stop()


@pytest.fixture
def backend(request):
    return getattr(request, "param", "embedded")


@pytest.fixture
def kb_config(backend, request):
    """The settings that put a KB's indexes on `backend`."""
    if backend == "milvus":
        return {"index": {"backend": "milvus"}, "milvus": {"uri": request.getfixturevalue("milvus_uri")}}
    return {}


@pytest.fixture
def kb(tmp_path, kb_config):
    k = KnowledgeBase.create(tmp_path / "kb", embedder="hash", notify=lambda m: None, config=kb_config)
    yield k
    k.close()


@pytest.fixture
def corpus_kb(kb):
    kb.ingest([CORPUS])
    return kb


def write(path, content, mode="w"):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, mode) as f:
        f.write(content)
    return str(path)



def isolated(test):
    """Run this test in a child pytest process. Native code (llama.cpp) that crashes then fails this one
    test with a clear message instead of killing the whole run."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        if os.environ.get("WBRAG_ISOLATED") == test.__name__:
            return test(*args, **kwargs)
        node = f"{inspect.getfile(test)}::{test.__name__}"
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", node],
                              capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, WBRAG_ISOLATED=test.__name__))
        if proc.returncode < 0:
            pytest.fail(f"{test.__name__} crashed in native code ({signal.Signals(-proc.returncode).name}); "
                        "llama-cpp-python must be built portable (CMAKE_ARGS=-DGGML_NATIVE=OFF, see the Makefile)\n"
                        + proc.stderr[-3000:], pytrace=False)
        if proc.returncode != 0:
            pytest.fail(f"{test.__name__} failed in its child process:\n{proc.stdout[-6000:]}", pytrace=False)
    return wrapper
