"""In the spirit of sqlite-utils' test_docs.py: every command, option and setting is documented."""

import os
import sys

import pytest
import typer

from conftest import ROOT
from writeback_rag import config
from writeback_rag.cli import app

sys.path.insert(0, os.path.join(ROOT, "docs"))
import generate  # noqa: E402

DOCS = os.path.join(ROOT, "docs")


def read(name):
    with open(os.path.join(DOCS, name), encoding="utf-8") as f:
        return f.read()


ALL = list(generate.commands(typer.main.get_command(app)))


@pytest.mark.parametrize("name", [n for n, _ in ALL])
def test_every_command_and_option_is_documented(name):
    cli, readme = read("cli.md"), open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert f"## `{name}`" in cli, f"{name} missing from docs/cli.md: run docs/generate.py"
    cmd = dict(ALL)[name]
    section = cli.split(f"## `{name}`", 1)[1].split("\n## ", 1)[0]
    for p in cmd.params:
        if p.param_type_name == "option":
            for opt in p.opts:
                assert f"`{opt}`" in section, f"{name} {opt} missing from docs/cli.md: run docs/generate.py"
    top = name.split(" ")[1]
    assert f"wbrag {top}" in readme, f"README never shows `wbrag {top}`"


@pytest.mark.parametrize("key", list(config.SCHEMA))
def test_every_setting_is_documented(key):
    assert f"`{key}`" in read("config.md"), f"{key} missing from docs/config.md: run docs/generate.py"


@pytest.mark.parametrize("name", list(generate.FILES))
def test_generated_docs_are_current(name):
    assert read(name) == generate.FILES[name]() + "\n", f"docs/{name} is out of date: run docs/generate.py"
