"""Which instance records which streams: `--shard i/N` splits each exchange's symbol universe.

Why a hash of (exchange, symbol) and nothing else: the split must be the same on every machine
and at every restart with no coordinator, and a new listing must land on one shard without
moving anybody else's streams. A stable hash (not Python's per-process `hash()`) of the pair,
modulo N, has all three properties; symbols are spread evenly enough for hundreds of them.
Changing N moves streams, as it must; the sanity report (coverage) shows a universe split with
two different N (a symbol recorded twice or by no shard).
"""
from __future__ import annotations

import hashlib
from typing import NamedTuple


class Shard(NamedTuple):
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, exchange: str, symbol: str) -> bool:
        return shard_of(exchange, symbol, self.count) == self.index


ALL = Shard(0, 1)


def shard_of(exchange: str, symbol: str, count: int) -> int:
    digest = hashlib.blake2b(f"{exchange.lower()}:{symbol.upper()}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def parse(text: str) -> Shard:
    """`i/N` with 0 <= i < N -> Shard; ValueError with the reason otherwise."""
    index, sep, count = str(text).strip().partition("/")
    if not sep or not index.strip().isdigit() or not count.strip().isdigit():
        raise ValueError("expected i/N, e.g. 0/3 (shard index / number of shards)")
    i, n = int(index), int(count)
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"{i}/{n}: the index must be 0..{max(n, 1) - 1} and N >= 1")
    return Shard(i, n)
