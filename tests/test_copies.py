"""Code that diffusers' loader forces us to duplicate between `utils/` modules (a helper module cannot import its
siblings, DESIGN section 3) is marked `# Copied from cosegment.utils.<module>.<name>`; like diffusers' `make
fix-copies` check, these tests keep every copy identical in source to its original."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^# Copied from cosegment\.((?:\w+\.)*\w+)\.(\w+)\s*$")


def _definitions(path: Path) -> dict[str, str]:
    """Top-level functions, classes and assignments of a module by name, as source text."""
    source = path.read_text(encoding="utf-8")
    definitions = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            definitions[node.name] = ast.get_source_segment(source, node)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            definitions[node.targets[0].id] = ast.get_source_segment(source, node)
    return definitions


def _copies() -> list[tuple[str, str, str, str]]:
    """(copy's file, its name, original module, original name) for every marker in the package."""
    copies = []
    for path in sorted(ROOT.glob("**/*.py")):
        parts = path.relative_to(ROOT).parts
        if "tests" in parts or parts[0] in ("build", "dist") or any(part.startswith(".") for part in parts):
            continue  # the package's own files only: not a build copy, a virtual environment or a hidden folder
        lines = path.read_text(encoding="utf-8").splitlines()
        for index, line in enumerate(lines):
            match = MARKER.match(line)
            if not match:
                continue
            following = next(ln for ln in lines[index + 1 :] if not ln.startswith("#"))
            name = re.match(r"(?:def|class)\s+(\w+)|(\w+)\s*=", following)
            copies.append((str(path.relative_to(ROOT)), name.group(1) or name.group(2), *match.groups()))
    return copies


def test_the_known_copies_are_marked():
    marked = {(file, name) for file, name, _, _ in _copies()}
    assert ("utils/segmentation.py", "_finite_sample") in marked
    assert ("utils/segmentation.py", "_CHUNK_ELEMENTS") in marked
    for name in ("_check_grid", "token_coordinates", "_NEIGHBOUR_OFFSETS", "_neighbour_slices"):
        assert ("utils/joining.py", name) in marked


@pytest.mark.parametrize(("file", "name", "module", "original"), _copies(), ids=lambda v: str(v))
def test_copies_are_identical_to_their_original(file, name, module, original):
    assert name == original, f"{file}: the copy of {module}.{original} is named {name}"
    original_path = ROOT / (module.replace(".", "/") + ".py")
    assert original_path.is_file(), f"{file}: {module} is not a module of the package"
    copy_source = _definitions(ROOT / file)[name]
    original_source = _definitions(original_path)[original]
    assert copy_source == original_source, f"{file}:{name} differs from {module}.{original}; copy it again"


def test_a_changed_copy_is_detected(tmp_path):
    """The check itself: a one-character change in a copy makes the sources differ."""
    original = _definitions(ROOT / "utils/correspondence.py")["_finite_sample"]
    changed = tmp_path / "changed.py"
    changed.write_text(original.replace("-math.inf", "math.inf") + "\n", encoding="utf-8")
    assert _definitions(changed)["_finite_sample"] != original
