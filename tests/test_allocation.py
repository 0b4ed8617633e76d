"""Allocation, pure: candidates, static, weighted rendezvous hashing, geoLatency."""

from __future__ import annotations

import collections

import pytest

from provisiond.allocation import AllocationError, allocate, candidate_hubs, nearest_hubs
from provisiond.models import AllocationPolicy, LinkedHub
from provisiond.regions import distance_km, is_valid_name, normalize


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


# --- geoLatency ----------------------------------------------------------------------------------


def located(name: str, location: str | None, weight: int = 1) -> LinkedHub:
    return LinkedHub(host_name=name, allocation_weight=weight, location=location)


def test_region_names_and_distances() -> None:
    assert normalize("West Europe") == normalize("west-europe") == normalize("WESTEUROPE") == "westeurope"
    assert distance_km("westeurope", "West Europe") == 0
    assert distance_km("plant-7", "Plant 7") == 0  # a name of the operator's own is near itself
    assert distance_km("plant-7", "westeurope") is None and distance_km(None, "westeurope") is None
    # Amsterdam-Dublin about 750 km, Amsterdam-Virginia about 6,500 km
    assert 700 < distance_km("westeurope", "northeurope") < 800  # type: ignore[operator]
    assert 6000 < distance_km("westeurope", "eastus") < 7000  # type: ignore[operator]
    assert distance_km("eastus", "westeurope") == distance_km("westeurope", "eastus")
    assert is_valid_name("West Europe") and is_valid_name("plant_7")
    assert not is_valid_name("") and not is_valid_name("a;b") and not is_valid_name("x" * 65)
    assert not is_valid_name("--")


def test_geolatency_picks_the_nearest_hubs() -> None:
    eu, eu2, us = located("eu", "westeurope"), located("eu2", "North Europe"), located("us", "eastus")
    hubs = [us, eu, eu2]
    for i in range(100):
        assert allocate(AllocationPolicy.GEO_LATENCY, f"d{i}", hubs, region="westeurope") == eu
        # Paris: Amsterdam is nearer than Dublin
        assert allocate(AllocationPolicy.GEO_LATENCY, f"d{i}", hubs, region="francecentral") == eu
        assert allocate(AllocationPolicy.GEO_LATENCY, f"d{i}", hubs, region="eastus2") == us
    assert nearest_hubs("ukwest", hubs) == [eu2]  # Cardiff: Dublin
    assert nearest_hubs("eastus", [eu, located("own", "plant-7")]) == [eu]  # unknown distance loses


def test_geolatency_ties_go_by_weight_and_hash_the_same_everywhere() -> None:
    """Hubs at the same distance tie; among them weighted rendezvous hashing decides, as for
    hashed, so every node in that region makes the same choice."""
    a, b = located("a", "westeurope"), located("b", "West Europe", 3)
    far = located("far", "eastus", 1000)
    hubs = [a, b, far]
    picks = collections.Counter(
        allocate(AllocationPolicy.GEO_LATENCY, f"dev-{i}", hubs, region="westeurope").host_name
        for i in range(4000)
    )
    assert set(picks) == {"a", "b"} and 2.3 < picks["b"] / picks["a"] < 3.8
    for i in range(200):
        reg = f"dev-{i}"
        assert allocate(AllocationPolicy.GEO_LATENCY, reg, hubs, region="westeurope") == allocate(
            AllocationPolicy.HASHED, reg, [a, b]
        )
        # order of the candidates does not matter
        assert allocate(AllocationPolicy.GEO_LATENCY, reg, hubs[::-1], region="westeurope") == allocate(
            AllocationPolicy.GEO_LATENCY, reg, hubs, region="westeurope"
        )


def test_geolatency_without_a_known_distance_is_hashed() -> None:
    hubs = [located("a", "westeurope"), located("b", None, 3), located("c", "plant-7")]
    for i in range(100):
        reg = f"dev-{i}"
        hashed = allocate(AllocationPolicy.HASHED, reg, hubs)
        assert allocate(AllocationPolicy.GEO_LATENCY, reg, hubs) == hashed  # no region
        assert allocate(AllocationPolicy.GEO_LATENCY, reg, hubs, region="my-lab") == hashed  # nothing near
    # a region of the operator's own prefers the hubs located there
    assert allocate(AllocationPolicy.GEO_LATENCY, "x", hubs, region="Plant 7").host_name == "c"
