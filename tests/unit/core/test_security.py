"""Passwords and tokens."""

from __future__ import annotations

import pytest

from qvd.core import security


def test_random_password_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # A leading '-' makes `qa --password -xyz` read the password as an option.
    draws = iter(["-starts-with-dash", "-again", "fine-one"])
    monkeypatch.setattr(security.secrets, "token_urlsafe", lambda n: next(draws))
    assert security.random_password() == "fine-one"


def test_password_hash_round_trip() -> None:
    stored = security.hash_password("secret")
    assert stored.startswith("$argon2id$")
    assert security.verify_password(stored, "secret")
    assert not security.verify_password(stored, "other")
