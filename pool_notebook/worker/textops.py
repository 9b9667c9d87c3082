"""Text helpers of the ``alc`` API: ``alc.chunk``, ``alc.match_enum``, ``alc.match_bool``.

Pure functions on Python strings with algocline's semantics (its
``bridge/text.rs`` and ``bridge/fuzzy.rs``): line splitting as Rust's
``str::lines``, Jaro-Winkler (rapidfuzz) for the fuzzy fallback, whole-word
keyword polarity for yes/no answers.
"""

from __future__ import annotations

import re

__all__ = ["chunk", "match_bool", "match_enum"]

_TRUE_WORDS = ("approved", "yes", "ok", "accept", "pass", "confirm", "agree", "true", "lgtm")
_FALSE_WORDS = ("rejected", "no", "deny", "block", "fail", "refuse", "disagree", "false")


def _lines(text: str) -> list[str]:
    """Rust's ``str::lines``: split on \\n, drop one trailing empty line, strip \\r."""
    parts = text.split("\n")
    if parts and parts[-1] == "":
        parts.pop()
    return [p[:-1] if p.endswith("\r") else p for p in parts]


def chunk(text: str, *, mode: str = "lines", size: int = 50, overlap: int = 0) -> list[str]:
    """Windows of ``size`` lines (or characters with ``mode="chars"``), ``overlap`` shared."""
    units: list[str] = list(text) if mode == "chars" else _lines(text)
    if not units or size <= 0:
        return []
    step = size - overlap if overlap < size else 1
    joiner = "" if mode == "chars" else "\n"
    out = []
    start = 0
    while start < len(units):
        end = min(start + size, len(units))
        out.append(joiner.join(units[start:end]))
        if end == len(units):
            break
        start += step
    return out


def match_enum(text: str, candidates: list[str], threshold: float = 0.7) -> str | None:
    """The candidate named last in ``text`` (case-insensitive); else the closest word by
    Jaro-Winkler similarity at or above ``threshold``; else None."""
    lowered = text.lower()
    best: tuple[int, str] | None = None
    for c in candidates:
        pos = lowered.rfind(c.lower())
        if pos >= 0 and (best is None or pos > best[0]):
            best = (pos, c)
    if best is not None:
        return best[1]
    from rapidfuzz.distance import JaroWinkler  # only for the fuzzy fallback

    fuzzy: tuple[float, int] | None = None
    for raw in lowered.split():
        token = raw.strip("".join({ch for ch in raw if not ch.isalnum()}))
        if not token:
            continue
        for i, c in enumerate(candidates):
            sim = JaroWinkler.similarity(token, c.lower())
            if sim >= threshold and (fuzzy is None or sim > fuzzy[0]):
                fuzzy = (sim, i)
    return candidates[fuzzy[1]] if fuzzy is not None else None


def match_bool(text: str) -> bool | None:
    """Polarity of the last whole-word yes/no keyword in ``text``; None if there is none."""
    lowered = text.lower()
    last: tuple[int, bool] | None = None
    for words, polarity in ((_TRUE_WORDS, True), (_FALSE_WORDS, False)):
        for word in words:
            for m in re.finditer(rf"(?<![a-z0-9]){word}(?![a-z0-9])", lowered):
                if last is None or m.start() > last[0]:
                    last = (m.start(), polarity)
    return None if last is None else last[1]
