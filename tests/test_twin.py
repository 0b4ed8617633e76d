"""Twins as IoT Hub keeps them: merge rules, version counters, the shapes each side reads, limits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from provisiond import twin as tw
from provisiond.errors import InvalidBodyError, TwinLimitError

NOW = "2026-12-04T10:00:00.000000Z"
LATER = "2026-12-04T10:05:00.000000Z"


def test_merge_patch_rules() -> None:
    target = {"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2]}
    patch = {"a": None, "b": {"c": None, "x": {"y": None, "z": 1}}, "e": [3], "f": "new"}
    assert tw.merge_patch(target, patch) == {"b": {"d": 3, "x": {"z": 1}}, "e": [3], "f": "new"}
    assert target == {"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2]}, "the target is not changed"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=5),
    lambda children: st.dictionaries(st.text("abc", min_size=1, max_size=2), children, max_size=3),
    max_leaves=8,
)


@given(
    st.dictionaries(st.text("abc", min_size=1, max_size=2), json_values, max_size=4),
    st.dictionaries(st.text("abc", min_size=1, max_size=2), json_values, max_size=4),
)
def test_merge_patch_is_idempotent_and_drops_nulls(target: dict, patch: dict) -> None:
    once = tw.merge_patch(target, patch)
    assert tw.merge_patch(once, patch) == once

    def no_nulls(value: object) -> bool:
        if isinstance(value, dict):
            return all(v is not None and no_nulls(v) for v in value.values())
        return True

    assert no_nulls(tw.merge_patch({}, patch))


def test_version_counters() -> None:
    twin = tw.initial({"site": "a"}, {"interval": 5}, now=NOW)
    assert (twin.version, twin.desired_version, twin.reported_version) == (1, 1, 1)
    reported = tw.patch_reported(twin, {"battery": 90}, now=LATER)
    assert (reported.version, reported.desired_version, reported.reported_version) == (2, 1, 2)
    desired = tw.patch_desired(reported, {"interval": 10}, now=LATER)
    assert (desired.version, desired.desired_version, desired.reported_version) == (3, 2, 2)
    tagged = tw.update_tags(desired, {"site": "b"}, now=LATER)
    assert (tagged.version, tagged.desired_version) == (4, 2)
    assert tw.twin_etag(tagged) != tw.twin_etag(desired)
    assert tw.twin_etag(twin) == "AAAAAAAAAAE="


def test_device_view_has_versions_and_no_tags() -> None:
    twin = tw.patch_reported(tw.initial({"t": 1}, {"d": 1}, now=NOW), {"r": 2}, now=NOW)
    assert tw.device_view(twin) == {"desired": {"d": 1, "$version": 1}, "reported": {"r": 2, "$version": 2}}
    empty = tw.Twin()
    assert tw.device_view(empty) == {"desired": {"$version": 1}, "reported": {"$version": 1}}


def test_desired_changes_and_notification() -> None:
    before = tw.initial(None, {"a": 1, "b": 2}, now=NOW)
    after = tw.patch_desired(before, {"a": None, "b": 3, "c": {"x": 1}}, now=LATER)
    changes = tw.desired_changes(before, after)
    assert changes == {"a": None, "b": 3, "c": {"x": 1}}
    assert tw.desired_notification(changes, after.desired_version) == {
        "a": None,
        "b": 3,
        "c": {"x": 1},
        "$version": 2,
    }
    assert tw.desired_changes(after, after) is None


def test_section_view_metadata() -> None:
    twin = tw.patch_desired(tw.Twin(), {"a": 1}, now=NOW)
    twin = tw.patch_reported(twin, {"r": True}, now=LATER)
    view = tw.section_view(twin)
    assert view["desired"]["$version"] == 2
    assert view["desired"]["$metadata"]["a"] == {"$lastUpdated": NOW, "$lastUpdatedVersion": 2}
    assert view["desired"]["$metadata"]["$lastUpdated"] == NOW
    assert view["reported"]["$metadata"]["r"] == {"$lastUpdated": LATER}
    assert view["reported"]["$version"] == 2


def test_replace_keeps_reported() -> None:
    twin = tw.patch_reported(tw.initial({"a": 1}, {"x": 1}, now=NOW), {"r": 1}, now=NOW)
    replaced = tw.replace(twin, {"b": 2}, {"y": {"z": None, "w": 1}}, now=LATER)
    assert replaced.tags == {"b": 2}
    assert replaced.desired == {"y": {"w": 1}}
    assert replaced.reported == {"r": 1}
    assert replaced.desired_version == twin.desired_version + 1


@pytest.mark.parametrize(
    "patch",
    [[1, 2], "text", 5, None],
    ids=["array", "string", "number", "null"],
)
def test_a_patch_must_be_an_object(patch: object) -> None:
    with pytest.raises(InvalidBodyError, match="must be a JSON object"):
        tw.patch_reported(tw.Twin(), patch, now=NOW)


def test_dollar_members_are_iot_hubs() -> None:
    with pytest.raises(InvalidBodyError, match=r"\$version"):
        tw.patch_reported(tw.Twin(), {"$version": 3}, now=NOW)


def test_limits_refuse_the_whole_patch() -> None:
    twin = tw.patch_reported(tw.Twin(), {"keep": 1}, now=NOW)
    deep: dict = {"v": 1}
    for _ in range(11):
        deep = {"n": deep}
    with pytest.raises(TwinLimitError, match="nested deeper than 10 levels"):
        tw.patch_reported(twin, {"deep": deep}, now=LATER)
    with pytest.raises(TwinLimitError, match="32 KB"):
        tw.patch_reported(twin, {f"k{i}": "x" * 4000 for i in range(9)}, now=LATER)
    with pytest.raises(TwinLimitError, match="cannot contain"):
        tw.patch_desired(twin, {"a.b": 1}, now=LATER)
    with pytest.raises(TwinLimitError, match="8 KB"):
        tw.update_tags(twin, {f"t{i}": "x" * 3000 for i in range(3)}, now=LATER)
    # A patch that brings a twin back under the limit by deleting is fine.
    big = tw.patch_reported(twin, {f"k{i}": "x" * 3500 for i in range(9)}, now=LATER)
    smaller = tw.patch_reported(big, {"k0": None, "k1": None}, now=LATER)
    assert "k0" not in smaller.reported


def test_stored_form_round_trips() -> None:
    import msgspec

    twin = tw.patch_reported(tw.initial({"a": 1}, {"b": 2}, now=NOW), {"c": 3}, now=LATER)
    assert msgspec.json.decode(msgspec.json.encode(twin), type=tw.Twin) == twin
