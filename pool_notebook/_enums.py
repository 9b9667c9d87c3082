"""``enum.StrEnum`` on Python 3.10 too: members are strings that print as their values."""

from __future__ import annotations

import enum
import sys

__all__ = ["StrEnum"]

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:

    class StrEnum(str, enum.Enum):
        """A string enum whose ``str()`` and f-string form is its value."""

        def __str__(self) -> str:
            return str(self.value)
