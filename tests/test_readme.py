"""The README's tables stay true: the worker's variables and the engine's fields it lists
are exactly the ones the code has."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from lorafleet.worker.engine.config import EngineConfig
from lorafleet.worker.serve.settings import VARIABLES

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _table_after(heading: str) -> list[str]:
    """The first column of the first table after ``heading``, backticks stripped."""
    section = README[README.index(heading) :]
    rows = re.findall(r"^\| `([^|]+?)` \|", section[section.index("\n|") :], re.MULTILINE)
    table_end = section.index("\n\n", section.index("\n|"))
    return [r for r in rows if f"| `{r}`" in section[:table_end]]


def test_the_worker_variable_table_lists_every_variable():
    assert _table_after("## Worker (serving jobs)") == [v.env for v in VARIABLES]


def test_the_engine_configuration_table_lists_every_field():
    names = {
        n.strip(" `") for row in _table_after("## Engine configuration") for n in row.split("/")
    }
    assert names == {f.name for f in fields(EngineConfig)}
