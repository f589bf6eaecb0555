"""Data sources: the synthetic market model and the JSON-lines replay loader.

Why: every exchange module needs the same kind of market (a random-walk mid, a top of book,
trades at the touch, mark/index/funding/open-interest) but encodes it differently.  Keeping
the model here, in integer ticks/lots, means the exchange modules only format numbers, and
values stay realistic (bid < ask, positive sizes, BTC ~60000, ETH ~3000).  Prices are kept as
integer tick counts so formatting never yields float artefacts.

Replay (recorded frames) is parsed per exchange (`ExchangeBase.replay_items`), because topic
extraction and row counting are protocol specific; `read_lines` only yields the exact text.
"""
from __future__ import annotations

import math
import random

REAL_BASES = [
    ("BTC", 60000.0), ("ETH", 3000.0), ("SOL", 150.0), ("XRP", 0.6), ("DOGE", 0.15),
    ("BNB", 550.0), ("ADA", 0.45), ("AVAX", 30.0), ("LINK", 15.0), ("LTC", 80.0),
    ("DOT", 6.0), ("TRX", 0.12), ("ATOM", 8.0), ("NEAR", 5.0), ("APT", 8.0),
    ("ARB", 1.0), ("OP", 2.0), ("SUI", 1.2), ("FIL", 5.0), ("ETC", 25.0),
]
REF = dict(REAL_BASES)


def universe(symbols, seed=1):
    """-> list of (base, quote, ref_price).

    None: BTC, ETH with USDT and USDC; int N: N USDT perps (real names first, then synthetic
    X0001...) plus USDC perps for the first max(2, N // 50) bases; list: USDT + USDC for each.
    """
    rng = random.Random(f"universe-{seed}")
    out = []
    if symbols is None:
        symbols = ["BTC", "ETH"]
    if isinstance(symbols, int):
        bases = []
        for i in range(symbols):
            if i < len(REAL_BASES):
                bases.append(REAL_BASES[i])
            else:
                bases.append((f"X{i:04d}", round(10 ** rng.uniform(-1.5, 3.5), 6)))
        for b, p in bases:
            out.append((b, "USDT", p))
        for b, p in bases[:min(len(bases), max(2, symbols // 50))]:
            out.append((b, "USDC", p))
        return out
    for b in symbols:
        b = b.upper()
        p = REF.get(b) or round(10 ** rng.uniform(-1, 3), 4)
        out.append((b, "USDT", p))
    for b in symbols:
        b = b.upper()
        out.append((b, "USDC", REF.get(b) or out[[x[0] for x in out].index(b)][2]))
    return out


def decimals_for(price: float) -> tuple[int, int]:
    """(price decimals, qty decimals) giving ~6 significant price digits."""
    e = math.floor(math.log10(price))
    pdec = max(1, min(6, 4 - e)) if e >= 0 else min(7, 5 - e)
    if e >= 2:
        qdec = 3 if e >= 3 else 2
    elif e >= 0:
        qdec = 1
    else:
        qdec = 0
    return pdec, qdec


class Inst:
    """Market state of one instrument on one exchange (integers: ticks and lots)."""

    __slots__ = ("base", "quote", "sym", "topic", "pdec", "qdec", "tick", "lot", "bid", "spread",
                 "bsz", "asz", "step", "mark", "index", "fr", "oi", "nft", "ex", "rng",
                 "silent_bbo", "silent_trades", "silent_other", "hist", "hist2", "price0",
                 "typ_lots", "quiet", "__dict__")

    def __init__(self, base, quote, price, sym, rng: random.Random):
        self.base, self.quote, self.sym, self.rng = base, quote, sym, rng
        self.price0 = price
        self.pdec, self.qdec = decimals_for(price)
        self.tick = 10.0 ** -self.pdec
        self.lot = 10.0 ** -self.qdec
        self.bid = int(price * (1 + rng.uniform(-0.001, 0.001)) / self.tick)
        self.spread = 1
        self.step = max(1, int(price * 0.00003 / self.tick))
        self.typ_lots = max(1, int(2000.0 / price / self.lot))
        self.bsz = self.lots()
        self.asz = self.lots()
        self.mark = self.mid()
        self.index = self.mark
        self.fr = round(rng.uniform(-0.00005, 0.00015), 8)
        self.oi = self.typ_lots * self.lot * rng.uniform(5e3, 5e4)
        self.silent_bbo = self.silent_trades = False
        self.silent_other = set()
        self.quiet = False             # no trades, no book changes (Simulator.quiet)
        self.ex = {}

    def lots(self) -> int:
        r = self.rng.random()
        return max(1, int(self.typ_lots * (0.05 + 20 * r * r * r)))

    def mid(self) -> float:
        return (self.bid + self.spread / 2.0) * self.tick

    def move(self):
        """One top-of-book change: price step and/or size change."""
        rng = self.rng
        r = rng.random()
        if r < 0.35:
            d = rng.randint(1, self.step)
            # mean reversion keeps prices around the reference forever
            up = rng.random() < (0.5 - 0.3 * (self.bid * self.tick / self.price0 - 1) * 100)
            self.bid += d if up else -d
            if self.bid < 10:
                self.bid = 10
            self.spread = 1 if rng.random() < 0.8 else rng.randint(2, 3)
            self.bsz = self.lots()
            self.asz = self.lots()
        elif r < 0.7:
            self.bsz = self.lots()
        else:
            self.asz = self.lots()

    def px(self, ticks: int) -> str:
        return "%.*f" % (self.pdec, ticks * self.tick)

    def qty(self, lots: int) -> str:
        return "%.*f" % (self.qdec, lots * self.lot)

    def fpx(self, v: float) -> str:
        return "%.*f" % (self.pdec, v)

    def update_mark(self):
        m = self.mid()
        self.index = m * (1 + self.rng.gauss(0, 0.00005))
        self.mark = m * (1 + self.rng.gauss(0, 0.00005))

    def update_funding(self):
        self.fr = round(min(0.003, max(-0.003, self.fr + self.rng.gauss(0, 0.00001))), 8)

    def update_oi(self):
        self.oi = max(self.lot * 10, self.oi * (1 + self.rng.gauss(0, 0.002)))


def next_funding(now_ms: int, hours: int = 8) -> int:
    step = hours * 3600_000
    return (now_ms // step + 1) * step


def fake_uuid(rng: random.Random) -> str:
    h = "%032x" % rng.getrandbits(128)
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{h[16:20]}-{h[20:]}"
