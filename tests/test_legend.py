"""The dimension-letter legend of ``glocal/__init__.py`` is true: every suffixed tensor name
under ``glocal/`` (``x_BTD``, ``q_BKYTF``, ``S_BKJE``) uses only letters of the package legend
or of its own file's "Letters added here (beyond the package legend): ..." line, and no file
gives a package letter another meaning."""

from __future__ import annotations

import ast
import pathlib
import re

import glocal

ROOT = pathlib.Path(glocal.__file__).parent
ADDED = "Letters added here (beyond the package legend):"

# A name with a shape suffix: a lower_snake prefix (or one capital, as in ``S_BKJE``; ``dS_...``
# also counts) and a suffix of capitals only. ALL_CAPS constants (``GMM_IMPLS``) have a prefix of
# two or more capitals and are skipped; so are suffixes with digits (``max_BKYT1``).
_SUFFIXED = re.compile(r"^_*(?P<prefix>[A-Za-z][A-Za-z0-9]*(?:_[a-z0-9]+)*)_(?P<suffix>[A-Z]+)$")

# Names outside the scheme on purpose: {(path under glocal/, name): why}. Keep it short.
EXEMPT: dict[tuple[str, str], str] = {}


def package_legend() -> dict[str, str]:
    """``{letter: meaning}`` from the legend block of ``glocal.__doc__`` (two columns, a letter
    followed by two spaces)."""
    doc = glocal.__doc__
    block = doc[doc.index("Dimension letters"):doc.index("Logical parameter")]
    legend: dict[str, str] = {}
    for line in block.splitlines():
        for m in re.finditer(r"(?:^ +| {2,})([A-Z]) {2}(?=\S)(.*?)(?= {2,}[A-Z] {2}\S|$)", line):
            assert m.group(1) not in legend, f"letter {m.group(1)} defined twice in the package legend"
            legend[m.group(1)] = m.group(2).strip()
    return legend


def added_letters(tree: ast.Module) -> set[str]:
    """Letters a file adds: the first capital of each ``,``/``;``-separated entry of its
    "Letters added here" paragraph (``Y query heads per kv head (H / K), Z ...`` -> Y, Z)."""
    doc = ast.get_docstring(tree) or ""
    if ADDED not in doc:
        return set()
    text = doc[doc.index(ADDED) + len(ADDED):].split("\n\n")[0]
    return set(re.findall(r"(?:^|[,;])\s*([A-Z])\s", text))


def suffixed_names(tree: ast.Module):
    """``(line, name, suffix)`` for every suffixed identifier: variables, attributes, function
    parameters and keyword arguments, dataclass fields, function names."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.arg):
            names = [node.arg]
        elif isinstance(node, ast.keyword) and node.arg:
            names = [node.arg]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names = [node.name]
        else:
            continue
        for name in names:
            m = _SUFFIXED.match(name)
            if m and not (len(m["prefix"]) > 1 and m["prefix"].isupper()):
                yield node.lineno, name, m["suffix"]


def _sources():
    for path in sorted(ROOT.rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), filename=str(path))


def test_package_legend_parses():
    legend = package_legend()
    assert len(legend) == 26, sorted(legend)  # every letter, each once
    assert legend["B"] == "batch" and legend["Y"].startswith("query heads per key/value head")


def test_no_file_redefines_a_package_letter():
    legend = package_legend()
    clashes = [f"glocal/{rel}: adds {sorted(added_letters(tree) & set(legend))}"
               for rel, tree in _sources() if added_letters(tree) & set(legend)]
    assert not clashes, "files giving package letters another meaning:\n" + "\n".join(clashes)


def test_every_suffix_letter_is_in_the_legend():
    legend = set(package_legend())
    offenders, checked, seen = [], 0, set()
    for rel, tree in _sources():
        allowed = legend | added_letters(tree)
        for line, name, suffix in suffixed_names(tree):
            checked += 1
            seen.add(name)
            unknown = sorted(set(suffix) - allowed)
            if unknown and (rel, name) not in EXEMPT:
                offenders.append(f"glocal/{rel}:{line}: {name} ({', '.join(unknown)} not in the legend)")
    # The scan must see the names it is about (a broken pattern would pass vacuously).
    assert {"x_BTD", "q_BTHE", "S_BKJE", "dS_BKJE", "wi_XDAI", "q_BKYTF"} <= seen
    assert checked > 1000, checked
    assert not offenders, "suffix letters outside the legend:\n" + "\n".join(sorted(set(offenders)))


def test_the_checks_catch_offenders():
    tree = ast.parse('"""Doc.\n\nLetters added here (beyond the package legend): Y heads, B batch."""\n'
                     "def f(x_BTD, GMM_IMPLS, max_BKYT1, _h_BT):\n    dS_BKJE = x_BTD.y_OZ\n")
    assert added_letters(tree) == {"Y", "B"}
    assert {(n, s) for _, n, s in suffixed_names(tree)} == {
        ("x_BTD", "BTD"), ("_h_BT", "BT"), ("dS_BKJE", "BKJE"), ("y_OZ", "OZ")}
