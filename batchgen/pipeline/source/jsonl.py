"""JSON Lines: parsing a line into the job's columns (never raising: a line that can't be used
is an error row), the nesting checks that keep json's recursion limit out of reach, probing a
file's first lines for its columns, and reading a file's rows."""
from __future__ import annotations

import json
import re
from typing import Any, Callable, Iterator

from .base import InputError, RowError, RowOrigin, RowRead
from .checks import MAX_DEPTH, value_problem
from .describe import first_line, kind_of
from .files import InputFile
from .lines import MAX_LINE_BYTES, jsonl_lines

# A line nested deeper than this is not parsed at all: json's own limit (RecursionError) counts
# the frames already on the call stack, so near it the same line could parse in one run and not
# in another. 200 levels leave json ~800 frames of the default limit of 1000 for its callers.
MAX_PARSE_DEPTH = 200

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_STRING_OR_BRACKET = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')  # a string (unrolled: fast) or a bracket


def nesting(raw: bytes) -> int:
    """How deeply a JSON text nests arrays and objects (brackets inside strings don't count)."""
    depth = deepest = 0
    for m in _STRING_OR_BRACKET.finditer(raw):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif c in (b"]", b"}"):
            depth -= 1
    return deepest


def too_deep(raw: bytes) -> bool:
    """Whether a line nests past MAX_PARSE_DEPTH (counting brackets first: most lines have few)."""
    return raw.count(b"[") + raw.count(b"{") > MAX_PARSE_DEPTH and nesting(raw) > MAX_PARSE_DEPTH


class JsonLine:
    """Parses JSONL lines into the job's columns; never raises: a line that can't be used
    becomes a RowError. Duplicate keys in what the job reads are refused (which value wins
    differs between tools)."""

    def __init__(self, need: list[str]) -> None:
        self.need = need
        self._dups: dict[int, list[str]] = {}  # id(dict) -> its repeated keys, for the line being parsed
        self._decoder = json.JSONDecoder(object_pairs_hook=self._pairs)

    def _pairs(self, pairs: list[tuple[str, Any]]) -> dict:
        d = dict(pairs)
        if len(d) != len(pairs):
            seen: set[str] = set()
            self._dups[id(d)] = [k for k, _ in pairs if k in seen or seen.add(k)]  # type: ignore[func-returns-value]
        return d

    def decode(self, text: str) -> Any:
        """json.loads, noting repeated keys (ValueError, RecursionError as json raises them)."""
        self._dups.clear()
        return self._decoder.decode(text)

    def _load(self, raw: bytes, origin: RowOrigin) -> Any:
        """The line's JSON value, or a RowError saying why it has none."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return RowError(f"{origin}: not valid UTF-8 (byte {e.start} of the line)", origin)
        if too_deep(raw):
            return RowError(f"{origin}: JSON nested too deeply to read (over {MAX_PARSE_DEPTH} levels)", origin)
        try:
            return self.decode(text)
        except ValueError as e:
            return RowError(f"malformed JSON at {origin}: {e}", origin)
        except RecursionError:  # not expected below MAX_PARSE_DEPTH; never a crash either way
            return RowError(f"{origin}: JSON nested too deeply to read", origin)

    def parse(self, raw: bytes, origin: RowOrigin) -> RowRead:
        obj = self._load(raw, origin)
        if isinstance(obj, RowError):
            return obj
        if not isinstance(obj, dict):
            return RowError(f"line {origin} is not a JSON object (it is {kind_of(obj)})", origin)
        row = {c: obj.get(c) for c in self.need}
        problem = self._duplicates(obj, row) if self._dups else None
        # cheap filters first: only a line with many brackets can nest deeply, only a \\uD8xx
        # escape can make a lone surrogate (raw UTF-8 can't encode one: it failed to decode above)
        deep = raw.count(b"[") + raw.count(b"{") > MAX_DEPTH
        surrogates = _SURROGATE_ESCAPE.search(raw) is not None
        if problem is None and (deep or surrogates):
            for c in self.need:
                problem = value_problem(c, row[c], surrogates)
                if problem:
                    break
        return RowError(f"{origin}: {problem}", origin) if problem else row

    def _duplicates(self, top: dict, row: dict) -> str | None:
        top_dups = [k for k in self._dups.get(id(top), []) if k in self.need]
        if top_dups:
            return f"key '{top_dups[0]}' appears more than once"
        nested = set(self._dups) - {id(top)}
        for c, v in row.items():
            stack = [v]
            while stack:
                x = stack.pop()
                if isinstance(x, dict):
                    if id(x) in nested:
                        return f"key '{self._dups[id(x)][0]}' appears more than once in column '{c}'"
                    stack.extend(x.values())
                elif isinstance(x, list):
                    stack.extend(x)
        return None


def _not_jsonl_hint(path: str) -> str:
    """What a file whose first lines hold no JSON object looks like instead."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:2] in (b"\xff\xfe", b"\xfe\xff", b"{\x00", b"\x00{"):
        return " (it looks like UTF-16; JSON Lines must be UTF-8)"
    if head.lstrip()[:1] == b"[":
        return " (a JSON array? one object per line is needed: jq -c '.[]' FILE)"
    return ""


def _probe_line(parser: JsonLine, lineno: int, raw: bytes) -> tuple[Any, str]:
    """(the line's JSON value or None, what is wrong with it or "")."""
    try:
        if too_deep(raw):
            raise ValueError(f"nested over {MAX_PARSE_DEPTH} levels")
        return parser.decode(raw.decode("utf-8")), ""
    except (ValueError, RecursionError) as e:
        return None, f"line {lineno}: {first_line(e)}"


def probe_jsonl(f: InputFile, max_rows: int = 100, max_bytes: int = 1 << 20) -> tuple[list[str], list[dict], int]:
    """The keys and rows of the first JSON objects of a JSONL file, and how many non-blank lines
    were looked at. InputError for a file that can't be read or whose first lines hold no JSON
    object at all (not JSON Lines: a JSON array, another format, UTF-16...)."""
    keys: list[str] = []
    rows: list[dict] = []
    parser = JsonLine([])
    seen = nbytes = 0
    any_object = False
    first_problem = ""
    for lineno, raw in jsonl_lines(f):
        seen += 1
        if raw is None:
            first_problem = first_problem or f"line {lineno} is over {MAX_LINE_BYTES:,} bytes"
            continue
        nbytes += len(raw)
        obj, problem = _probe_line(parser, lineno, raw)
        first_problem = first_problem or problem
        any_object = any_object or isinstance(obj, dict)
        if isinstance(obj, dict):
            keys += [k for k in obj if k not in keys]
            if value_problem("", obj) is None:  # a row the reader refuses must not type a column
                rows.append(obj)
        elif obj is not None:
            first_problem = first_problem or f"line {lineno} is {kind_of(obj)}"
        if len(rows) >= max_rows or nbytes >= max_bytes:
            break
    if seen and not any_object:
        raise InputError(f"input file {f.rel}: not JSON Lines: none of its first {seen} line(s) is a JSON object "
                         f"({first_problem}){_not_jsonl_hint(f.path)}")
    return keys, rows, seen


def read_jsonl(f: InputFile, need: list[str], first: int, count: int | None,
               id_checked: Callable[[RowRead, RowOrigin], RowRead]) -> Iterator[RowRead]:
    """Rows first .. first+count of a JSONL file (non-blank lines), parsed and id-checked."""
    parser = JsonLine(need)
    k = 0  # rows (non-blank lines) before this one
    emitted = 0
    for lineno, raw in jsonl_lines(f):
        if k < first:
            k += 1
            continue
        if count is not None and emitted >= count:
            return
        origin = RowOrigin(f.rel, k, lineno)
        k += 1
        emitted += 1
        if raw is None:
            yield RowError(f"{origin}: the line is over the limit of {MAX_LINE_BYTES:,} bytes", origin)
        else:
            yield id_checked(parser.parse(raw, origin), origin)
