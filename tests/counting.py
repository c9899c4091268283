"""Counting calls in tests."""

from __future__ import annotations

import pytest


def count_applies(monkeypatch: pytest.MonkeyPatch, function: type) -> list[int]:
    """Count calls of an autograd Function's apply (calls[0]) for the rest of the test."""
    calls = [0]
    original = function.apply

    def counting(*args: object) -> object:
        calls[0] += 1
        return original(*args)

    monkeypatch.setattr(function, "apply", counting)
    return calls
