"""The README's method and dataset tables list what the registries hold, so the docs cannot drift."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import pyromtl.datasets
import pyromtl.methods

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(text: str, heading: str) -> str:
    """The text under ``## heading`` up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(heading)}[ \t]*\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def _first_column_names(section: str) -> list[str]:
    """The backticked names in the first cell of every table row (header and ruler rows excluded)."""
    names = []
    for line in section.splitlines():
        if not line.startswith("|") or re.match(r"^\|\s*:?-", line):
            continue
        first = line.split("|")[1]
        names += re.findall(r"`([^`]+)`", first)
    return names


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text(encoding="utf-8")


def test_no_placeholders_left(readme):
    for placeholder in ("DATASETS_TABLE", "LOADERS_TABLE"):
        assert placeholder not in readme


def test_every_dataset_is_in_the_dataset_tables(readme):
    listed = _first_column_names(_section(readme, "Datasets"))
    missing = [name for name in pyromtl.datasets.available() if name not in listed]
    assert not missing, f"datasets missing from the README's Datasets tables: {missing}"


def test_every_dataset_row_names_a_registered_dataset(readme):
    listed = _first_column_names(_section(readme, "Datasets"))
    assert listed, "no table rows found under '## Datasets'"
    unknown = [name for name in listed if name not in pyromtl.datasets.available()]
    assert not unknown, f"README's Datasets tables list unregistered datasets: {unknown}"


def test_every_method_is_in_the_method_table(readme):
    listed = _first_column_names(_section(readme, "Methods"))
    missing = [name for name in pyromtl.methods.available() if name not in listed]
    assert not missing, f"methods missing from the README's Methods table: {missing}"
