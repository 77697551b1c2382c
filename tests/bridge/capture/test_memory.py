"""The memory budget: its automatic size, the block programs' share, row groups."""

from __future__ import annotations

import pytest

from bridge.capture import memory
from bridge.capture.memory import MemoryBudgetError, block_program_bytes, budget_bytes, plan_row_groups


def test_a_configured_budget_is_taken_as_mib_everywhere():
    assert budget_bytes(300) == 300 << 20
    assert block_program_bytes(300) == 300 << 20


def test_the_automatic_budget_is_an_eighth_of_memory_at_most_a_gib_and_blocks_get_half(monkeypatch):
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": (4 << 30) // 4096}  # a 4 GiB machine
    monkeypatch.setattr(memory.os, "sysconf", lambda k: pages[k])
    assert budget_bytes(None) == 512 << 20
    assert block_program_bytes(None) == 256 << 20
    pages["SC_PHYS_PAGES"] = (64 << 30) // 4096
    assert budget_bytes(None) == 1 << 30
    assert block_program_bytes(None) == 512 << 20


def test_row_groups_fit_the_budget_and_keep_the_layer_order():
    floats = {"a": 256, "b": 256, "c": 512}
    groups, rows = plan_row_groups(floats, rows=1024, copies=2, budget=4 << 20)
    assert [n for g in groups for n in g] == ["a", "b", "c"]
    for g in groups:
        assert sum(floats[n] * 4 * 2 * rows[n] for n in g) <= 4 << 20


def test_a_layer_that_cannot_fit_names_itself_and_the_field():
    with pytest.raises(MemoryBudgetError, match=r"'wide'.*memory_budget=1 MiB"):
        plan_row_groups({"wide": 1 << 20}, rows=1024, copies=2, budget=1 << 20)


def test_releasing_freed_memory_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    memory.release_freed_memory()
