"""What ``alc.state`` and ``alc.card`` keep on disk, in algocline's layout.

- :class:`StateStore`: one JSON object per namespace, ``<root>/<ns>.json``
  (algocline: ``~/.algocline/state/<ns>.json``), rewritten atomically under an
  exclusive ``flock`` so that several workers sharing a home never lose a write.
- :class:`CardStore`: immutable run records, ``<root>/<pkg>/<card_id>.toml``,
  per-case samples in ``<card_id>.samples.jsonl`` beside them (write-once), and
  the mutable alias table ``<root>/_aliases.toml``; the query DSL (``where``,
  ``order_by``), lineage walks and error texts follow algocline's ``card.rs``.

Errors are :class:`StoreError` with algocline's message text; natives turn
them into Lua errors.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

from .._version import __version__
from .jsontext import float_text

__all__ = ["CardStore", "StateStore", "StoreError"]

SCHEMA_VERSION = "card/v0"
_DEFAULT_LINEAGE_DEPTH = 10


class StoreError(Exception):
    """A state or card operation that cannot be done (the text is the Lua error)."""


def _check_name(name: str, kind: str) -> None:
    if not name or "/" in name or "\\" in name or ".." in name or "\0" in name:
        raise StoreError(f"Invalid {kind} name: '{name}'")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside ``path`` (``<path>.lock``) across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- state


class StateStore:
    """Key-value JSON per namespace; every call reads and writes the file."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, ns: str) -> Path:
        if not ns or "/" in ns or "\\" in ns or ".." in ns or "\0" in ns:
            raise StoreError(f"Invalid namespace: '{ns}'")
        return self.root / f"{ns}.json"

    def _load(self, path: Path, ns: str) -> dict[str, Any]:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StoreError(f"Failed to read state '{ns}': {exc}") from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise StoreError(f"Failed to parse state '{ns}': {exc}") from None
        if not isinstance(data, dict):
            raise StoreError(f"Failed to parse state '{ns}': not a JSON object")
        return data

    def _update(self, ns: str, change: Callable[[dict[str, Any]], tuple[bool, Any]]) -> Any:
        """Apply ``change`` (returns (dirty, result)) under the namespace lock."""
        path = self.path(ns)
        with _locked(path):
            data = self._load(path, ns)
            dirty, result = change(data)
            if dirty:
                _write_atomic(path, json.dumps(data, ensure_ascii=False, indent=2))
            return result

    def get(self, ns: str, key: str) -> tuple[bool, Any]:
        """(found, value)."""
        data = self._load(self.path(ns), ns)
        return (key in data, data.get(key))

    def set(self, ns: str, key: str, value: Any) -> None:
        def change(data: dict[str, Any]) -> tuple[bool, None]:
            data[key] = value
            return True, None
        self._update(ns, change)

    def delete(self, ns: str, key: str) -> bool:
        def change(data: dict[str, Any]) -> tuple[bool, bool]:
            existed = key in data
            data.pop(key, None)
            return existed, existed
        return bool(self._update(ns, change))

    def keys(self, ns: str) -> list[str]:
        return list(self._load(self.path(ns), ns))

    def has(self, ns: str, key: str) -> bool:
        return key in self._load(self.path(ns), ns)

    def set_nx(self, ns: str, key: str, value: Any) -> bool:
        def change(data: dict[str, Any]) -> tuple[bool, bool]:
            if key in data:
                return False, False
            data[key] = value
            return True, True
        return bool(self._update(ns, change))

    def incr(self, ns: str, key: str, delta: float, default: float) -> float:
        def change(data: dict[str, Any]) -> tuple[bool, float]:
            current = data.get(key, default)
            if isinstance(current, bool) or not isinstance(current, (int, float)):
                raise StoreError(f"incr: value at '{key}' is not a number")
            new = float(current) + delta
            if not math.isfinite(new):
                raise StoreError(f"incr: value at '{key}' would not be finite")
            data[key] = new
            return True, new
        return float(self._update(ns, change))


# ----------------------------------------------------------------------------- cards


def _djb2_hex(text: str) -> str:
    h = 5381
    for b in text.encode("utf-8"):
        h = (h * 33 + b) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def _stable_json(value: Any) -> str:
    """Sorted-key compact JSON for hashing (strings unescaped, as algocline's)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return float_text(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ",".join(_stable_json(v) for v in value) + "]"
    return "{" + ",".join(f'"{k}":{_stable_json(value[k])}' for k in sorted(value)) + "}"


def _short_model(model_id: str) -> str:
    for prefix in ("claude-", "gpt-"):
        if model_id.startswith(prefix):
            model_id = model_id[len(prefix):]
            break
    short = "".join(c for c in model_id if c.isascii() and c.isalnum())
    return short or "model"


def _now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _drop_nulls(value: Any) -> Any:
    """JSON -> TOML-able: nulls are dropped (TOML has none), as algocline does."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value if v is not None]
    return value


def _toml_text(card: dict[str, Any]) -> str:
    try:
        return tomli_w.dumps(_drop_nulls(card))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"Failed to serialize card TOML: {exc}") from None


def _fetch(card: Any, path: list[str]) -> tuple[bool, Any]:
    node = card
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False, None
        node = node[key]
    return True, node


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _json_eq(a: Any, b: Any) -> bool:
    if _is_num(a) and _is_num(b):
        return bool(float(a) == float(b))
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return bool(a == b)


def _json_cmp(a: Any, b: Any) -> int | None:
    same = (_is_num(a) and _is_num(b)) or (isinstance(a, str) and isinstance(b, str)) or \
        (isinstance(a, bool) and isinstance(b, bool))
    if not same:
        return None
    return int((a > b) - (a < b))


_OPS = frozenset({"eq", "ne", "lt", "lte", "gt", "gte", "in", "nin", "exists", "contains",
                  "starts_with"})

Predicate = Callable[[Any], bool]


def parse_where(value: Any, prefix: tuple[str, ...] = ()) -> Predicate:
    """Compile a Prisma-style ``where`` table (algocline's DSL) into a predicate."""
    if not isinstance(value, dict):
        raise StoreError("where clause must be a table")
    clauses: list[Predicate] = []
    for key, val in value.items():
        if key in ("_and", "_or"):
            if not isinstance(val, list):
                raise StoreError(f"{key} must be an array of sub-predicates")
            clauses.append(_combine([parse_where(v, prefix) for v in val], key == "_and"))
        elif key == "_not":
            clauses.append(_negate(parse_where(val, prefix)))
        else:
            path = [*prefix, key]
            if isinstance(val, dict) and val and all(k in _OPS for k in val):
                clauses.extend(_comparison(path, op, arg) for op, arg in val.items())
            elif isinstance(val, dict):
                clauses.append(parse_where(val, (*prefix, key)))
            else:
                clauses.append(_comparison(path, "eq", val))
    return _combine(clauses, True)


def _combine(clauses: list[Predicate], every: bool) -> Predicate:
    def test(card: Any) -> bool:
        return all(p(card) for p in clauses) if every else any(p(card) for p in clauses)
    return test


def _negate(clause: Predicate) -> Predicate:
    def test(card: Any) -> bool:
        return not clause(card)
    return test


def _comparison(path: list[str], op: str, arg: Any) -> Predicate:
    def test(card: Any) -> bool:
        found, actual = _fetch(card, path)
        if op == "exists":
            return found == (arg if isinstance(arg, bool) else True)
        if op == "ne":
            return not found or not _json_eq(actual, arg)
        if op == "nin":
            return not found or (isinstance(arg, list) and not any(_json_eq(e, actual)
                                                                   for e in arg))
        if not found:
            return False
        if op == "eq":
            return _json_eq(actual, arg)
        if op == "in":
            return isinstance(arg, list) and any(_json_eq(e, actual) for e in arg)
        if op in ("contains", "starts_with"):
            if not isinstance(actual, str) or not isinstance(arg, str):
                return False
            return arg in actual if op == "contains" else actual.startswith(arg)
        order = _json_cmp(actual, arg)
        if order is None:
            return False
        return {"lt": order < 0, "lte": order <= 0, "gt": order > 0, "gte": order >= 0}[op]
    return test


def _order_keys(value: Any) -> list[tuple[list[str], bool]]:
    raw = [value] if isinstance(value, str) else value
    if not isinstance(raw, list):
        raise StoreError("order_by must be a string or array of strings")
    keys = []
    for item in raw:
        if not isinstance(item, str):
            raise StoreError("order_by array must contain strings")
        if not item:
            raise StoreError("order_by key must not be empty")
        desc = item.startswith("-")
        path = (item[1:] if desc else item).split(".")
        if any(not p for p in path):
            raise StoreError(f"invalid order_by key: '{item}'")
        keys.append((path, desc))
    return keys


@dataclass
class _Row:
    pkg: str
    card: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)


def _summary(pkg: str, card: dict[str, Any], stem: str) -> dict[str, Any]:
    out: dict[str, Any] = {"card_id": card.get("card_id") if isinstance(card.get("card_id"), str)
                           else stem, "pkg": pkg}
    for name, path in (("created_at", ["created_at"]), ("model", ["model", "id"]),
                       ("scenario", ["scenario", "name"])):
        found, v = _fetch(card, path)
        if found and isinstance(v, str):
            out[name] = v
    found, rate = _fetch(card, ["stats", "pass_rate"])
    if found and _is_num(rate):
        out["pass_rate"] = float(rate)
    return out


def _newest_first(rows: list[_Row]) -> list[_Row]:
    rows.sort(key=lambda r: (r.summary.get("created_at") or "", r.summary["card_id"]),
              reverse=True)
    return rows


class CardStore:
    """Cards under ``root`` (``<pkg>/<card_id>.toml``), samples and aliases beside them."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # ------------------------------------------------------------------ files

    def _locate(self, card_id: str) -> Path | None:
        _check_name(card_id, "card_id")
        if not self.root.is_dir():
            return None
        for pkg_dir in self.root.iterdir():
            candidate = pkg_dir / f"{card_id}.toml"
            if pkg_dir.is_dir() and candidate.exists():
                return candidate
        return None

    def _read(self, path: Path, card_id: str) -> dict[str, Any]:
        try:
            card: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise StoreError(f"Failed to parse card '{card_id}': {exc}") from None
        return card

    def _scan(self, pkg: str | None = None) -> list[_Row]:
        if pkg is not None:
            _check_name(pkg, "pkg")
        if not self.root.is_dir():
            return []
        dirs = [self.root / pkg] if pkg is not None else sorted(self.root.iterdir())
        rows = []
        for d in dirs:
            if not d.is_dir():
                continue
            for path in sorted(d.glob("*.toml")):
                try:
                    card = tomllib.loads(path.read_text(encoding="utf-8"))
                except (OSError, tomllib.TOMLDecodeError):
                    continue  # a corrupt file does not hide the others
                rows.append(_Row(d.name, card, _summary(d.name, card, path.stem)))
        return rows

    def _aliases_path(self) -> Path:
        return self.root / "_aliases.toml"

    def _read_aliases(self) -> list[dict[str, Any]]:
        path = self._aliases_path()
        if not path.exists():
            return []
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise StoreError(f"Failed to parse aliases file: {exc}") from None
        out = []
        for entry in data.get("alias", []):
            if isinstance(entry, dict) and isinstance(entry.get("name"), str) \
                    and isinstance(entry.get("card_id"), str):
                out.append({k: entry[k] for k in ("name", "card_id", "pkg", "set_at", "note")
                            if isinstance(entry.get(k), str)})
        return out

    def _samples_path(self, card_id: str) -> Path:
        path = self._locate(card_id)
        if path is None:
            raise StoreError(f"card '{card_id}' not found")
        return path.with_name(f"{card_id}.samples.jsonl")

    # ------------------------------------------------------------------ API

    def create(self, card: Any) -> tuple[str, str]:
        """Write a new card; returns (card_id, path)."""
        if not isinstance(card, dict):
            raise StoreError("alc.card.create: input must be a table")
        pkg = card.get("pkg")
        name = pkg.get("name") if isinstance(pkg, dict) else None
        if not isinstance(name, str):
            raise StoreError("alc.card.create: pkg.name is required")
        _check_name(name, "pkg")
        card = dict(card)
        card.setdefault("schema_version", SCHEMA_VERSION)
        card.setdefault("created_at", _now_rfc3339())
        card.setdefault("created_by", f"pool_notebook@{__version__}")
        if isinstance(card.get("params"), dict):
            card["param_fingerprint"] = _djb2_hex(_stable_json(card["params"]))
        card_id = card.get("card_id")
        if not isinstance(card_id, str) or not card_id:
            model = card.get("model")
            model_id = model.get("id") if isinstance(model, dict) else None
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            card_id = (f"{name}_{_short_model(model_id if isinstance(model_id, str) else '')}"
                       f"_{stamp}_{_djb2_hex(_stable_json(card))[-6:]}")
        _check_name(card_id, "card_id")
        card["card_id"] = card_id
        text = _toml_text(card)
        path = self.root / name / f"{card_id}.toml"
        with _locked(self.root / "_cards"):
            if path.exists() or self._locate(card_id) is not None:
                raise StoreError(f"alc.card.create: card '{card_id}' already exists (immutable)")
            _write_atomic(path, text)
        return card_id, str(path)

    def get(self, card_id: str) -> dict[str, Any] | None:
        path = self._locate(card_id)
        return None if path is None else self._read(path, card_id)

    def list_cards(self, pkg: str | None = None) -> list[dict[str, Any]]:
        return [r.summary for r in _newest_first(self._scan(pkg))]

    def append(self, card_id: str, fields: Any) -> dict[str, Any]:
        """Add new top-level keys (existing keys are immutable); returns the merged card."""
        with _locked(self.root / "_cards"):
            path = self._locate(card_id)
            if path is None:
                raise StoreError(f"alc.card.append: card '{card_id}' not found")
            if not isinstance(fields, dict):
                raise StoreError("alc.card.append: fields must be a table")
            card = self._read(path, card_id)
            for key, value in fields.items():
                if key in card:
                    raise StoreError(f"alc.card.append: key '{key}' already set on card "
                                     f"'{card_id}' (immutable)")
                if value is not None:
                    card[key] = value
            _write_atomic(path, _toml_text(card))
        return card

    def alias_set(self, name: str, card_id: str, pkg: str | None = None,
                  note: str | None = None) -> dict[str, Any]:
        _check_name(name, "alias")
        with _locked(self.root / "_cards"):
            if self._locate(card_id) is None:
                raise StoreError(f"alc.card.alias_set: card '{card_id}' not found")
            aliases = [a for a in self._read_aliases() if a["name"] != name]
            entry: dict[str, Any] = {"name": name, "card_id": card_id}
            if pkg is not None:
                entry["pkg"] = pkg
            entry["set_at"] = _now_rfc3339()
            if note is not None:
                entry["note"] = note
            aliases.append(entry)
            _write_atomic(self._aliases_path(), tomli_w.dumps({"alias": aliases}))
        return entry

    def alias_list(self, pkg: str | None = None) -> list[dict[str, Any]]:
        return [a for a in self._read_aliases() if pkg is None or a.get("pkg") == pkg]

    def get_by_alias(self, name: str) -> dict[str, Any] | None:
        _check_name(name, "alias")
        for alias in self._read_aliases():
            if alias["name"] == name:
                card = self.get(alias["card_id"])
                if card is None:
                    raise StoreError(f"alc.card.get_by_alias: alias '{name}' points at missing "
                                     f"card '{alias['card_id']}'")
                return card
        return None

    def find(self, *, pkg: str | None = None, where: Any = None, order_by: Any = None,
             limit: int | None = None, offset: int | None = None) -> list[dict[str, Any]]:
        """Summaries of the cards matching ``where``, sorted, then paged."""
        predicate = parse_where(where) if where is not None else None
        keys = _order_keys(order_by) if order_by is not None else []
        rows = self._scan(pkg)
        if predicate is not None:
            rows = [r for r in rows if predicate(r.card)]
        if keys:
            for path, desc in reversed(keys):  # stable sorts, last key first
                present = [r for r in rows if _fetch(r.card, path)[0]]
                missing = [r for r in rows if not _fetch(r.card, path)[0]]
                present.sort(key=_sort_key(path), reverse=desc)
                # missing values count as greatest: last ascending, first descending
                rows = missing + present if desc else present + missing
        else:
            rows = _newest_first(rows)
        start = offset or 0
        end = None if limit is None else start + limit
        return [r.summary for r in rows[start:end]]

    def write_samples(self, card_id: str, samples: Any) -> tuple[str, int]:
        if not isinstance(samples, list):
            raise StoreError("alc.card.write_samples: samples must be an array")
        with _locked(self.root / "_cards"):
            path = self._samples_path(card_id)
            if path.exists():
                raise StoreError(f"alc.card.write_samples: samples already exist for card "
                                 f"'{card_id}' (write-once)")
            lines = []
            for i, sample in enumerate(samples):
                try:
                    lines.append(json.dumps(sample, ensure_ascii=False, separators=(",", ":"),
                                            allow_nan=False) + "\n")
                except ValueError as exc:
                    raise StoreError(f"alc.card.write_samples: failed to serialize sample "
                                     f"#{i}: {exc}") from None
            _write_atomic(path, "".join(lines))
        return str(path), len(samples)

    def read_samples(self, card_id: str, *, offset: int = 0, limit: int | None = None,
                     where: Any = None) -> list[Any]:
        predicate = parse_where(where) if where is not None else None
        path = self._samples_path(card_id)
        if not path.exists():
            return []
        out: list[Any] = []
        skipped = 0
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
            except ValueError as exc:
                raise StoreError(f"Failed to parse sample line {i}: {exc}") from None
            if predicate is not None and not predicate(sample):
                continue
            if skipped < offset:
                skipped += 1
                continue
            if limit is not None and len(out) >= limit:
                break
            out.append(sample)
        return out

    def lineage(self, card_id: str, *, direction: str = "up", depth: int | None = None,
                include_stats: bool = True,
                relation_filter: list[str] | None = None) -> dict[str, Any] | None:
        """The ancestry (``metadata.prior_card_id``) and/or descendants of a card."""
        if direction not in ("up", "down", "both"):
            raise StoreError(f"direction must be 'up', 'down', or 'both' (got '{direction}')")
        rows = {r.summary["card_id"]: r for r in self._scan()}
        if card_id not in rows:
            return None
        max_depth = _DEFAULT_LINEAGE_DEPTH if depth is None else depth

        def prior(row: _Row) -> tuple[str | None, str | None]:
            meta = row.card.get("metadata")
            meta = meta if isinstance(meta, dict) else {}
            pid, rel = meta.get("prior_card_id"), meta.get("prior_relation")
            return (pid if isinstance(pid, str) else None, rel if isinstance(rel, str) else None)

        def passes(rel: str | None) -> bool:
            return relation_filter is None or (rel is not None and rel in relation_filter)

        def node(row: _Row, level: int) -> dict[str, Any]:
            pid, rel = prior(row)
            out: dict[str, Any] = {"card_id": row.summary["card_id"], "pkg": row.pkg,
                                   "depth": level}
            if pid is not None:
                out["prior_card_id"] = pid
            if rel is not None:
                out["prior_relation"] = rel
            if include_stats and "stats" in row.card:
                out["stats"] = row.card["stats"]
            return out

        nodes, edges = [node(rows[card_id], 0)], []
        visited, truncated = {card_id}, False
        if direction in ("up", "both"):
            current = card_id
            for step in range(1, max_depth + 1):
                pid, rel = prior(rows[current])
                if pid is None or not passes(rel) or pid in visited or pid not in rows:
                    break
                nodes.append(node(rows[pid], -step))
                edges.append(_edge(current, pid, rel))
                visited.add(pid)
                current = pid
            else:
                pid, _ = prior(rows[current])
                truncated = pid is not None and pid in rows and pid not in visited
        if direction in ("down", "both"):
            children: dict[str, list[str]] = {}
            for cid, row in rows.items():
                pid, _ = prior(row)
                if pid is not None:
                    children.setdefault(pid, []).append(cid)
            frontier = [card_id]
            for level in range(1, max_depth + 1):
                following = []
                for parent in frontier:
                    for child in children.get(parent, []):
                        rel = prior(rows[child])[1]
                        if child in visited or not passes(rel):
                            continue
                        nodes.append(node(rows[child], level))
                        edges.append(_edge(child, parent, rel))
                        visited.add(child)
                        following.append(child)
                if not following:
                    break
                frontier = following
            else:
                truncated = truncated or any(
                    child not in visited and passes(prior(rows[child])[1])
                    for parent in frontier for child in children.get(parent, []))
        return {"root": card_id, "nodes": nodes, "edges": edges, "truncated": truncated}

    def sink_backfill(self, sink: str, dry_run: bool = False) -> dict[str, Any]:
        """Replay cards into a named sink: this worker configures none, so every name is
        unknown (algocline's text)."""
        del dry_run
        raise StoreError(f"unknown sink: {sink}")


def _edge(src: str, dst: str, relation: str | None) -> dict[str, Any]:
    edge = {"from": src, "to": dst}
    if relation is not None:
        edge["relation"] = relation
    return edge


def _sort_key(path: list[str]) -> Callable[[_Row], _SortKey]:
    def key(row: _Row) -> _SortKey:
        return _SortKey(_fetch(row.card, path)[1])
    return key


class _SortKey:
    """Orders JSON values as algocline's ``order_by`` does: numbers, strings and bools
    among themselves; other pairs compare equal."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __lt__(self, other: _SortKey) -> bool:
        order = _json_cmp(self.value, other.value)
        return order is not None and order < 0
