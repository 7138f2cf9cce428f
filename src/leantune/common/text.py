"""Text comparison shared by evaluation (answer match) and checkable rewards."""

from __future__ import annotations

import string


def normalize(text: str) -> str:
    """Casefolded, inner whitespace collapsed, surrounding whitespace and punctuation cut."""
    return " ".join(text.casefold().split()).strip(string.punctuation + " ")
