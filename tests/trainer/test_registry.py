"""The one registry shape of methods, backbones and dataset readers."""

from __future__ import annotations

import sys

import pytest

from ciss.errors import CissError
from ciss.trainer.data import READERS
from ciss.trainer.methods import METHODS
from ciss.trainer.presets import BACKBONES
from ciss.trainer.registry import Registry


def test_a_registry_is_a_read_only_mapping_that_refuses_unknown_names_in_one_way():
    r = Registry("thing", {"b": 1, "a": 2})
    assert list(r) == ["b", "a"] and len(r) == 2 and r["a"] == 2 and "c" not in r and dict(r) == {"b": 1, "a": 2}
    with pytest.raises(CissError, match="unknown thing 'c'; known: b, a"):
        r["c"]
    for registry, kind in ((METHODS, "method"), (BACKBONES, "backbone"), (READERS, "dataset kind")):
        with pytest.raises(CissError, match=f"unknown {kind} 'nosuch'"):
            registry["nosuch"]


def test_an_entry_named_by_module_is_imported_on_first_use():
    r = Registry("codec", {"json": "json.decoder:JSONDecoder"})
    assert r["json"] is sys.modules["json.decoder"].JSONDecoder and r["json"] is r["json"]
    assert READERS["synthetic"].__name__ == "SyntheticDataset"
