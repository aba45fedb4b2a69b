"""Sets of input positions (a task's done rows, a shard's rows) as sorted, merged ranges."""
from __future__ import annotations

import bisect
from typing import Iterable, Iterator


class IntervalSet:
    """A set of non-negative ints as sorted, merged half-open ranges [a, b)."""

    def __init__(self, ranges: Iterable[Iterable[int]] = ()) -> None:
        self.r: list[list[int]] = []
        for a, b in sorted((int(x[0]), int(x[1])) for x in ranges):
            self._append(a, b)

    def _append(self, a: int, b: int) -> None:
        if a >= b:
            return
        if self.r and a <= self.r[-1][1]:
            self.r[-1][1] = max(self.r[-1][1], b)
        else:
            self.r.append([a, b])

    @classmethod
    def from_points(cls, points: Iterable[int]) -> "IntervalSet":
        s = cls()
        for p in sorted(points):
            s._append(p, p + 1)
        return s

    def update(self, other: "IntervalSet") -> None:
        merged = sorted(self.r + other.r)
        self.r = []
        for a, b in merged:
            self._append(a, b)

    def minus(self, other: "IntervalSet") -> "IntervalSet":
        """The points of self not in other."""
        out = IntervalSet()
        for a, b in self.r:
            for c, d in other.r:
                if d <= a or c >= b:
                    continue
                out._append(a, min(b, c))
                a = max(a, d)
            out._append(a, b)
        return out

    def overlap(self, other: "IntervalSet") -> list[int] | None:
        """The first range [a, b) in both sets, or None."""
        i = j = 0
        while i < len(self.r) and j < len(other.r):
            a, b = max(self.r[i][0], other.r[j][0]), min(self.r[i][1], other.r[j][1])
            if a < b:
                return [a, b]
            if self.r[i][1] < other.r[j][1]:
                i += 1
            else:
                j += 1
        return None

    def points(self) -> Iterator[int]:
        for a, b in self.r:
            yield from range(a, b)

    def __contains__(self, p: int) -> bool:
        i = bisect.bisect_right(self.r, [p, float("inf")]) - 1
        return i >= 0 and self.r[i][0] <= p < self.r[i][1]

    def __len__(self) -> int:
        return sum(b - a for a, b in self.r)

    def prefix_end(self) -> int:
        """k such that 0..k-1 are all in the set."""
        return self.r[0][1] if self.r and self.r[0][0] == 0 else 0

    def covers(self, n: int) -> bool:
        return self.prefix_end() >= n

    def ranges(self) -> list[list[int]]:
        return [list(x) for x in self.r]


def fmt_range(r: list[int]) -> str:
    """[a, b) as "a" (one position) or "a-(b-1)", for messages."""
    return str(r[0]) if r[1] == r[0] + 1 else f"{r[0]}-{r[1] - 1}"
