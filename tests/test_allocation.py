"""Allocation, pure: candidates, static, weighted rendezvous hashing."""

from __future__ import annotations

import collections

import pytest

from provisiond.allocation import AllocationError, allocate, candidate_hubs
from provisiond.models import AllocationPolicy, LinkedHub


def hub(name: str, weight: int = 1, apply: bool = True) -> LinkedHub:
    return LinkedHub(host_name=name, allocation_weight=weight, apply_allocation_policy=apply)


LINKED = {h.host_name: h for h in (hub("a"), hub("b", 3), hub("c", apply=False))}


def test_candidates_are_the_named_hubs_or_every_hub_that_applies_the_policy() -> None:
    assert [h.host_name for h in candidate_hubs([], LINKED)] == ["a", "b"]
    assert [h.host_name for h in candidate_hubs(["C", "a", "gone"], LINKED)] == ["c", "a"]


def test_hashed_is_deterministic_weighted_and_stable() -> None:
    hubs = candidate_hubs([], LINKED)
    picks = collections.Counter(
        allocate(AllocationPolicy.HASHED, f"dev-{i}", hubs).host_name for i in range(4000)
    )
    assert 2.3 < picks["b"] / picks["a"] < 3.8  # weight 3 against 1
    for i in range(50):
        assert allocate(AllocationPolicy.HASHED, f"dev-{i}", hubs) == allocate(
            AllocationPolicy.HASHED, f"DEV-{i}", hubs
        )
    # Adding a hub moves only devices to it (rendezvous hashing), never between the old ones.
    more = [*hubs, hub("d")]
    for i in range(500):
        before = allocate(AllocationPolicy.HASHED, f"dev-{i}", hubs).host_name
        after = allocate(AllocationPolicy.HASHED, f"dev-{i}", more).host_name
        assert after in (before, "d")


def test_static_geolatency_and_no_candidates() -> None:
    assert allocate(AllocationPolicy.STATIC, "x", [LINKED["b"]], named=["b"]).host_name == "b"
    with pytest.raises(AllocationError, match="static"):
        allocate(AllocationPolicy.STATIC, "x", candidate_hubs([], LINKED))
    hubs = candidate_hubs([], LINKED)
    assert allocate(AllocationPolicy.GEO_LATENCY, "x", hubs) == allocate(AllocationPolicy.HASHED, "x", hubs)
    with pytest.raises(AllocationError, match="None of the enrollment's IoT hubs"):
        allocate(AllocationPolicy.HASHED, "x", [], named=["gone"])
    with pytest.raises(AllocationError, match="applyAllocationPolicy"):
        allocate(AllocationPolicy.HASHED, "x", [])
