"""The errorCode catalogue: each code once, consistent with the error classes, documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import provisiond.errors as errors_module
from provisiond.errors import DpsCode, NotFoundError, ProvisioningError

DOCS = Path(__file__).resolve().parent.parent / "docs" / "service-api.md"


def _documented() -> set[int]:
    """Every code the catalogue table of docs/service-api.md lists (ranges expanded)."""
    codes: set[int] = set()
    for line in DOCS.read_text().splitlines():
        cell = line.split("|")[1] if line.startswith(("| 4", "| 5")) else ""
        for low, high in re.findall(r"(\d{6})(?:-(\d{6}))?", cell):
            codes.update(range(int(low), int(high or low) + 1))
    return codes


def test_every_code_is_documented() -> None:
    missing = [code.name for code in DpsCode if int(code) not in _documented()]
    assert not missing, f"docs/service-api.md's table lacks {missing}"


def test_every_class_default_agrees_with_its_status() -> None:
    classes = [
        c for c in vars(errors_module).values() if isinstance(c, type) and issubclass(c, ProvisioningError)
    ]
    for cls in classes:
        code = cls.error_code
        assert isinstance(code, DpsCode), f"{cls.__name__}.error_code is a bare number"
        assert code.http_status == cls.http_status, cls.__name__


def test_a_code_of_another_status_is_our_bug() -> None:
    with pytest.raises(AssertionError):
        NotFoundError("x", error_code=DpsCode.TOKEN_EXPIRED)
    assert NotFoundError("x", error_code=DpsCode.ENROLLMENT_NOT_FOUND).error_code == 404201


def test_templates() -> None:
    assert DpsCode.BODY_TOO_LARGE.message(limit=98304) == "The request body exceeds the 98304-byte limit."
    assert DpsCode.NO_HUB.http_status == 400 and int(DpsCode.NO_HUB) == 400208


def test_no_numeric_error_codes_outside_the_catalogue() -> None:
    src = Path(__file__).resolve().parent.parent / "src" / "provisiond"
    offenders = []
    for path in src.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"error_code\s*=\s*\d|get_or_404\([^)]*\b\d{6}\)", code):
                offenders.append(f"{path.relative_to(src)}:{number}")
    assert not offenders
