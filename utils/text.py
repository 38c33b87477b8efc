"""Wording of printed numbers."""
from __future__ import annotations


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """`n` and the noun in the number it takes: "1 image", "2 images" (`nouns`: an irregular plural)."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"
