"""JSON text as algocline's serde_json writes it.

``json_text``: compact, keys sorted (serde_json's map order) and floats in
ryu's notation (``1e16``, ``0.000015``, ``1e-7``, where Python writes
``1e+16``, ``1.5e-05``, ``1e-07``). ``float_text`` is that notation for one
float (card fingerprints hash it).
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["float_text", "json_text"]

#: What an exponent looks like in a float's repr (a digit first: "e-mail" is not one).
_EXPONENT = re.compile(r"\de[+-]\d")


def json_text(value: Any) -> str:
    """``value`` (JSON-able Python) as serde_json's compact text."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                      sort_keys=True)
    if not _EXPONENT.search(text):
        return text  # no float needed an exponent (the common case)
    import secrets  # rare path: keep the worker's import light

    nonce = secrets.token_hex(8)
    floats: list[str] = []

    def swap(v: Any) -> Any:
        if isinstance(v, float) and _exponent_form(v):
            floats.append(float_text(v))
            return f"\0{nonce}:{len(floats) - 1}\0"
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v
    text = json.dumps(swap(value), ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                      sort_keys=True)
    for i, literal in enumerate(floats):
        text = text.replace(f'"\\u0000{nonce}:{i}\\u0000"', literal, 1)
    return text


def float_text(x: float) -> str:
    """A finite float as ryu writes it (Python's repr where the two agree)."""
    if not _exponent_form(x):
        return repr(x)
    mantissa, exponent = repr(x).split("e")
    power = int(exponent)
    if power == -5:  # ryu writes 10^-5 <= |x| < 10^-4 without an exponent
        sign, digits = ("-", mantissa[1:]) if mantissa.startswith("-") else ("", mantissa)
        return f"{sign}0.0000{digits.replace('.', '')}"
    return f"{mantissa}e{power}"


def _exponent_form(x: float) -> bool:
    """Python's repr of ``x`` has an exponent (|x| < 1e-4 or >= 1e16, not 0)."""
    return x != 0 and not 1e-4 <= abs(x) < 1e16
