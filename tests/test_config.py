"""The configuration schema: defaults in one place, every key checked on load and on `wbrag config`."""

import os
import tomllib

import pytest
from typer.testing import CliRunner

from writeback_rag import KnowledgeBase
from writeback_rag import config as cfgmod
from writeback_rag.cli import app
from writeback_rag.errors import ConfigError

runner = CliRunner()


@pytest.fixture
def kb_path(tmp_path):
    path = str(tmp_path / "kb")
    assert runner.invoke(app, ["init", "--kb", path, "--embedder", "hash"]).exit_code == 0
    return path


def wbrag(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(r, code=2, *needles):
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("wbrag: error: "), r.output
    assert "Traceback" not in r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_new_kb_has_exactly_the_schema_defaults(tmp_path):
    kb = KnowledgeBase.create(tmp_path / "kb", embedder="hash", notify=lambda m: None)
    want = cfgmod.defaults()
    want["embedder"]["name"] = "hash"
    assert kb.config == want
    with open(os.path.join(kb.path, "config.toml"), "rb") as f:
        assert cfgmod.validate(tomllib.load(f)) == want  # the written file is valid TOML and round-trips
    assert cfgmod.defaults()["retrieval"]["max_units"] == 1 and cfgmod.defaults()["writeback"]["include_query"] is True
    kb.close()


@pytest.mark.parametrize("setting, needle", [
    ("dense.index=ivf", "one of flat, hnsw"),
    ("retrieval.mode=semantic", "one of bm25, dense, hybrid"),
    ("retrival.k=3", "unknown setting 'retrival.k'"),
    ("retrieval.max_unit=3", "did you mean retrieval.max_units"),
    ("bm25.k1=abc", "bm25.k1"),
    ("retrieval.candidates=many", "an integer"),
    ("chunking.size=big", "chunking.size"),
    ("retrieval.rrf_k=sixty", "retrieval.rrf_k"),
    ("writeback.batch=x", "writeback.batch"),
    ("bm25.k1=-5", "from 0.0 to 10.0"),
    ("chunking.size=0", "chunking.size"),
    ("chunking.overlap=500", "must be below chunking.size"),
    ("writeback.include_query=maybe", "true or false"),
    ("llm.backend=gpt", "llm.backend"),
    ("writeback.distiller=abstractive", "extractive"),
    ("nonsense", "SECTION.NAME=VALUE"),
])
def test_bad_settings_refused_in_one_line_and_file_unchanged(kb_path, setting, needle):
    cpath = os.path.join(kb_path, "config.toml")
    before = open(cpath).read()
    args = ["config", "--kb", kb_path, setting] + (["llm.model=x"] if setting == "nonsense" else [])
    line = one_line_error(wbrag(*args), 2, needle)
    if "unknown setting" in line:
        assert "valid settings:" in line
    assert open(cpath).read() == before


def test_config_set_read_one_key_and_toml_values(kb_path):
    r = wbrag("config", "--kb", kb_path, "llm.backend=openai", "llm.model=smollm2", "writeback.include_query=no",
              "bm25.k1=1.5", "retrieval.max_units=-1")
    assert r.exit_code == 0, r.output
    assert "writeback.include_query = false" in r.output and 'llm.model = "smollm2"' in r.output
    assert "True" not in r.output and "False" not in r.output
    assert wbrag("config", "--kb", kb_path, "llm.model").output == "smollm2\n"
    assert wbrag("config", "--kb", kb_path, "bm25.k1").output == "1.5\n"
    assert wbrag("config", "--kb", kb_path, "writeback.include_query").output == "false\n"
    with open(os.path.join(kb_path, "config.toml"), "rb") as f:
        data = tomllib.load(f)
    assert data["writeback"]["include_query"] is False and data["retrieval"]["max_units"] == -1
    kb = KnowledgeBase.open(kb_path)
    assert kb.config["llm"]["model"] == "smollm2" and kb.config["bm25"]["k1"] == 1.5
    kb.close()
    one_line_error(wbrag("config", "--kb", kb_path, "llm.modle"), 2, "did you mean llm.model")
    one_line_error(wbrag("config", "--kb", kb_path, "embedder.name=minilm"), 2, "wbrag reindex --re-embed")
    one_line_error(wbrag("config", "--kb", kb_path, "embedder.precision=bf16"), 2, "wbrag reindex --re-embed")
    # how vectors are computed, not what they are: changed like any setting
    assert wbrag("config", "--kb", kb_path, "embedder.batch_size=0", "embedder.threads=1").exit_code == 0
    assert wbrag("config", "--kb", kb_path, "embedder.batch_size").output == "0\n"


def test_hand_edited_bad_value_is_refused_on_open_and_can_be_repaired(kb_path):
    cpath = os.path.join(kb_path, "config.toml")
    text = open(cpath).read().replace('mode = "hybrid"', 'mode = "semantic"')
    open(cpath, "w").write(text)
    line = one_line_error(wbrag("query", "--kb", kb_path, "fog"), 2, "config.toml", "retrieval.mode")
    assert '"semantic"' in line
    assert wbrag("config", "--kb", kb_path, "retrieval.mode=bm25").exit_code == 0
    assert wbrag("query", "--kb", kb_path, "fog").exit_code == 0
    open(cpath, "a").write("\n[retrieval]\nextra = 1\n")  # duplicate table: not TOML
    one_line_error(wbrag("stats", "--kb", kb_path), 2, "invalid TOML")


def test_api_config_overrides_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="retrieval.fusion"):
        KnowledgeBase.create(tmp_path / "a", embedder="hash", config={"retrieval": {"fusion": "max"}})
    with pytest.raises(ConfigError, match="unknown section"):
        KnowledgeBase.create(tmp_path / "b", embedder="hash", config={"retreival": {"k": 1}})
    with pytest.raises(ConfigError, match="an integer"):
        KnowledgeBase.create(tmp_path / "c", embedder="hash", config={"retrieval": {"candidates": True}})
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_every_key_has_a_type_default_and_doc():
    for k in cfgmod.KEYS:
        assert k.doc and k.check(k.default, "") == k.default, k.path
    assert len(cfgmod.SCHEMA) == len(cfgmod.KEYS)


def test_values_with_equals_signs_words_for_booleans_and_partial_files(kb_path):
    cpath = os.path.join(kb_path, "config.toml")
    r = wbrag("config", "--kb", kb_path, "llm.base_url=http://127.0.0.1:9/v1?key=a=b")
    assert r.exit_code == 0, r.output
    assert wbrag("config", "--kb", kb_path, "llm.base_url").output == "http://127.0.0.1:9/v1?key=a=b\n"
    for word, value in (("off", "false"), ("on", "true"), ("false", "false"), ("yes", "true"), ("0", "false"),
                        ("1", "true"), ("no", "false"), ("true", "true")):
        assert wbrag("config", "--kb", kb_path, f"writeback.include_query={word}").exit_code == 0
        assert wbrag("config", "--kb", kb_path, "writeback.include_query").output == value + "\n", word
    open(cpath, "w").write('[embedder]\nname = "hash"\n')  # a hand-written file with one section
    assert wbrag("config", "--kb", kb_path, "llm.model=tiny").exit_code == 0
    assert wbrag("config", "--kb", kb_path, "llm.model").output == "tiny\n"
    assert wbrag("config", "--kb", kb_path, "bm25.k1").output == "1.2\n"  # the rest: defaults


def test_errors_show_the_value_typed(kb_path):
    for setting, shown in (("bm25.k1=abc", '"abc"'), ("retrieval.k=x", "retrieval.k"),
                           ("writeback.include_query=maybe", '"maybe"'), ("chunking.size=3", "= 3:")):
        line = one_line_error(wbrag("config", "--kb", kb_path, setting), 2)
        assert shown in line, (setting, line)
