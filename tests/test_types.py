"""The Python API as a library people read: every public method typed and documented, and the package
type-checks with mypy (its settings in pyproject.toml)."""

import inspect
import subprocess
import sys

import pytest

from conftest import ROOT
from writeback_rag import KnowledgeBase

PUBLIC = [name for name, member in inspect.getmembers(KnowledgeBase)
          if not name.startswith("_") and (inspect.isfunction(member) or inspect.ismethod(member))]


def test_the_public_surface_is_found():
    """The parametrized checks below run over these names: an empty list would check nothing."""
    assert {"create", "open", "open_or_create", "search", "feedback", "writeback", "sync", "retire"} <= set(PUBLIC)


@pytest.mark.parametrize("name", PUBLIC)
def test_public_method_is_typed_and_documented(name):
    fn = getattr(KnowledgeBase, name)
    assert inspect.getdoc(fn), f"KnowledgeBase.{name} has no docstring"
    sig = inspect.signature(fn)
    missing = [p for p in sig.parameters.values() if p.name not in ("self", "cls")
               and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.annotation is inspect.Parameter.empty]
    assert not missing and sig.return_annotation is not inspect.Signature.empty, \
        f"KnowledgeBase.{name}: annotate {[p.name for p in missing] or 'the return'}"


def test_package_type_checks():
    r = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
