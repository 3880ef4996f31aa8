"""Static memory planning: one arena, offsets chosen from value lifetimes.

Buffers whose lifetimes (first and last step that touch them, inclusive) overlap get disjoint
byte ranges; the rest may share. Placement is greedy by decreasing size, each buffer going into
the smallest gap that fits among the buffers it overlaps in time.
"""

from __future__ import annotations

from dataclasses import dataclass

ALIGN = 64


@dataclass(frozen=True)
class Buffer:
    name: str
    nbytes: int
    first: int  # first step that touches it (-1: a graph input, written before step 0)
    last: int  # last step that touches it (len(steps): a graph output, read after the run)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_offsets(buffers: list[Buffer]) -> tuple[dict[str, int], int]:
    """Returns byte offsets per buffer name and the arena size."""
    placed: list[tuple[int, int, Buffer]] = []  # (offset, aligned size, buffer)
    offsets: dict[str, int] = {}
    arena = 0
    for buf in sorted(buffers, key=lambda b: (-b.nbytes, b.first, b.name)):
        size = _align(max(buf.nbytes, 1))
        busy = sorted(
            (off, off + sz) for off, sz, other in placed
            if not (other.last < buf.first or buf.last < other.first)
        )
        best, best_gap, cursor = None, None, 0
        for lo, hi in busy:
            gap = lo - cursor
            if gap >= size and (best_gap is None or gap < best_gap):
                best, best_gap = cursor, gap
            cursor = max(cursor, hi)
        offset = best if best is not None else cursor
        placed.append((offset, size, buf))
        offsets[buf.name] = offset
        arena = max(arena, offset + size)
    return offsets, arena
