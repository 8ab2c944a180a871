"""Version choice by weighted rendezvous hashing."""

from __future__ import annotations

import pytest

from router.traffic.split import choose_version, user_bucket, validate_split

USERS = [f"user-{i}" for i in range(2000)]


def share(split: dict[str, int], version: str) -> float:
    return sum(choose_version(split, u) == version for u in USERS) / len(USERS)


def test_a_ten_percent_canary_gets_ten_percent_of_users() -> None:
    assert 0.07 <= share({"v1": 90, "v2": 10}, "v2") <= 0.13


def test_the_same_user_always_gets_the_same_version() -> None:
    split = {"v1": 50, "v2": 50}
    first = [choose_version(split, u) for u in USERS[:200]]
    assert [choose_version(dict(split), u) for u in USERS[:200]] == first


def test_raising_the_canary_moves_nobody_off_it() -> None:
    at_10 = {u for u in USERS if choose_version({"v1": 90, "v2": 10}, u) == "v2"}
    at_20 = {u for u in USERS if choose_version({"v1": 80, "v2": 20}, u) == "v2"}
    assert at_10 <= at_20
    assert 0.17 <= len(at_20) / len(USERS) <= 0.23


def test_users_do_not_shuffle_between_versions_whose_weights_stand() -> None:
    before = {u: choose_version({"a": 40, "b": 40, "c": 20}, u) for u in USERS}
    after = {u: choose_version({"a": 40, "b": 40, "c": 20, "d": 0}, u) for u in USERS}
    assert before == after
    grown = {u: choose_version({"a": 30, "b": 30, "c": 40}, u) for u in USERS}
    assert all(grown[u] == "c" for u in USERS if before[u] == "c")
    assert not any(before[u] == "a" and grown[u] == "b" for u in USERS)


def test_zero_percent_is_never_chosen_and_no_key_is_random() -> None:
    assert {choose_version({"v1": 100, "v2": 0}, u) for u in USERS[:300]} == {"v1"}
    assert {choose_version({"v1": 50, "v2": 50}, None) for _ in range(200)} == {"v1", "v2"}
    with pytest.raises(ValueError):
        choose_version({"v1": 0}, "x")


def test_user_bucket_is_stable_and_bounded() -> None:
    assert user_bucket("alice") == user_bucket("alice")
    assert all(0 <= user_bucket(u) < 10_000 for u in USERS[:100])
    assert user_bucket(None) is None


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ({}, "empty"),
        ({"v1": 60, "v2": 30}, "sum to 90"),
        ({"v1": 50, "v3": 50}, "not active versions: v3"),
        ({"v1": 50.5, "v2": 49.5}, "whole numbers: v1, v2"),
        ({"v1": 150, "v2": -50}, "between 0 and 100: v1, v2"),
        ({"v1": True, "v2": 99}, "whole numbers: v1"),
    ],
)
def test_bad_splits_name_the_offending_keys(split: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_split(split, {"v1", "v2"})


def test_a_good_split_validates() -> None:
    assert validate_split({"v1": 70, "v2": 30}, {"v1", "v2"}) == {"v1": 70, "v2": 30}
