"""The dependency rule (STYLE.md §2.1), read from the source: the sans-io protocol layer and
the attestation types import nothing from storage, the service, the device client or the CLI;
the device client imports nothing from the service or storage. Every import counts, also those
inside functions and under ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import provisiond

PACKAGE = Path(provisiond.__file__).parent

RULES = {
    "protocol": ("storage", "service", "device", "cli"),
    "attestation": ("storage", "service", "device", "cli"),
    "device": ("service", "storage"),
}


def _module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(root: Path, path: Path) -> set[str]:
    """The absolute names of every module ``path`` (in the package at ``root``) imports
    (``from x import y``: ``x`` and ``x.y``)."""
    module = _module_name(root, path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def violations(root: Path, layer: str, forbidden: tuple[str, ...]) -> list[str]:
    banned = tuple(f"provisiond.{name}" for name in forbidden)
    out = []
    for path in sorted((root / layer).rglob("*.py")):
        for name in sorted(imports_of(root, path)):
            if name in banned or name.startswith(tuple(f"{b}." for b in banned)):
                out.append(f"{path.relative_to(root)} imports {name}")
    return out


@pytest.mark.parametrize(("layer", "forbidden"), list(RULES.items()), ids=list(RULES))
def test_layers_import_only_what_they_may(layer: str, forbidden: tuple[str, ...]) -> None:
    assert (PACKAGE / layer).is_dir()
    assert violations(PACKAGE, layer, forbidden) == []


def test_the_check_sees_relative_absolute_and_nested_imports(tmp_path: Path) -> None:
    root = tmp_path / "provisiond"
    (root / "attestation").mkdir(parents=True)
    (root / "attestation" / "_layering_probe.py").write_text(
        "from __future__ import annotations\n"
        "from ..storage import Store\n"
        "from . import base\n"
        "import provisiond.service.app\n"
        "def f():\n"
        "    from .. import cli\n"
    )
    assert violations(root, "attestation", RULES["attestation"]) == [
        "attestation/_layering_probe.py imports provisiond.cli",
        "attestation/_layering_probe.py imports provisiond.service.app",
        "attestation/_layering_probe.py imports provisiond.storage",
        "attestation/_layering_probe.py imports provisiond.storage.Store",
    ]
