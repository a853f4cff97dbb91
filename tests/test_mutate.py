"""The mutation list of scripts/mutate.py stays true to the code it quotes.

Each mutation replaces an exact text that must occur exactly once; when a refactor
moves or rewrites that code, this test fails and names the mutation to update (the
mutants themselves run only with `python scripts/mutate.py`)."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("engine_mutate_script", ROOT / "scripts" / "mutate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module             # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


mutate = _load()


def test_every_mutation_matches_the_tree_exactly_once():
    assert mutate.problems(ROOT) == []


def test_drift_is_reported_by_name(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("")
    (tmp_path / "a.py").write_text("x = 1\nx = 1\n")
    moved = mutate.Mutation("twice", "a.py", "x = 1", "x = 2", "", "tests/test_x.py")
    gone = mutate.Mutation("gone", "a.py", "y = 1", "y = 2", "", "tests/test_x.py")
    missing = mutate.Mutation("nofile", "b.py", "x", "y", "", "tests/test_y.py -k z")
    found = mutate.problems(tmp_path, (moved, gone, missing))
    assert [p.split(":")[0] for p in found] == ["twice", "gone", "nofile"]
    assert "occurs 2 times" in found[0] and "occurs 0 times" in found[1]
    with pytest.raises(mutate.Drift, match="twice"):
        mutate.mutated_text(tmp_path, moved)


def test_a_mutant_is_applied_to_a_copy_only():
    """The working tree is never written: the replacement is computed, not applied."""
    m = mutate.MUTATIONS[0]
    before = (ROOT / m.path).read_text()
    text = mutate.mutated_text(ROOT, m)
    assert text != before and m.new in text and (ROOT / m.path).read_text() == before
