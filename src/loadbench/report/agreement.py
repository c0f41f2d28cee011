"""Do two runs of a study rank the configurations the same way? Their result cards
(`card.py`) compared per dataset: the order of the configurations both ran, the fastest, and
every pair that flips, told apart by whether the flip is larger than the noise (the pair's 95%
intervals apart in both) or not.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from loadbench.report.card import Ranked, Ranking, ResultCard
from loadbench.report.tables import Table


@dataclass
class RankingComparison:
    """How two cards rank the configurations of one dataset that both ranked."""

    dataset: str
    a_order: list[str]  # the configurations in both, in A's order
    b_order: list[str]  # the same, in B's order
    real: list[tuple[str, str]]  # flips (faster in A, faster in B), intervals apart in both
    noise: list[tuple[str, str]]  # flips whose intervals overlap in A or in B
    caches: tuple[str | None, str | None]

    @property
    def same_order(self) -> bool:
        return self.a_order == self.b_order

    @property
    def first_difference(self) -> int | None:
        """The first position (from 1) where the two orders differ."""
        pairs = zip(self.a_order, self.b_order, strict=True)
        return next((k for k, (a, b) in enumerate(pairs, 1) if a != b), None)

    @property
    def kendall_tau(self) -> float | None:
        """1: the same order, -1: reversed (tau-a; ranks have no ties)."""
        pairs = list(itertools.combinations(self.a_order, 2))
        if not pairs:
            return None
        where = {name: k for k, name in enumerate(self.b_order)}
        kept = sum(where[x] < where[y] for x, y in pairs)
        return (2 * kept - len(pairs)) / len(pairs)

    def verdict(self) -> str:
        """One line: do the rankings agree, and if not, from where and whether beyond noise."""
        n, ds = len(self.a_order), self.dataset
        caches = "" if self.caches[0] == self.caches[1] else (
            f" (A ranks {self.caches[0]}-cache runs, B {self.caches[1]})")  # fmt: skip
        if not n:
            return f"{ds}: no configuration ranked in both{caches}"
        if self.same_order:
            return (f"{ds}: rankings agree (the same order of {_count(n, 'configuration')}; "
                    f"fastest in both: {self.a_order[0]}){caches}")  # fmt: skip
        k = self.first_difference
        text = (f"{ds}: rankings differ from #{k} (A: {self.a_order[k - 1]}, B: "
                f"{self.b_order[k - 1]}; Kendall tau {self.kendall_tau:.2f}): ")  # fmt: skip
        if self.real:
            text += f"a real disagreement, intervals apart in both: {_flips(self.real)}"
            text += f"; {len(self.noise)} more flip(s) within noise" if self.noise else ""
        else:
            text += (f"within noise: the intervals of {_count(len(self.noise), 'flipped pair')} "
                     "overlap in A or in B")  # fmt: skip
        return text + caches


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" + ("" if n == 1 else "s")


def compare_cards(a: ResultCard, b: ResultCard) -> list[RankingComparison]:
    """Per dataset ranked in both, the configurations both ranked, compared."""
    return [_compare(ds, a.rankings[ds], b.rankings[ds]) for ds in a.rankings if ds in b.rankings]


def _compare(dataset: str, a: Ranking, b: Ranking) -> RankingComparison:
    ranked_a = {c.configuration: c for c in a.configurations if c.median_epoch_s is not None}
    ranked_b = {c.configuration: c for c in b.configurations if c.median_epoch_s is not None}
    a_order = [name for name in ranked_a if name in ranked_b]
    b_order = [name for name in ranked_b if name in ranked_a]
    where = {name: k for k, name in enumerate(b_order)}
    real, noise = [], []
    for x, y in itertools.combinations(a_order, 2):
        if where[x] > where[y]:
            apart = _apart(ranked_a[x], ranked_a[y]) and _apart(ranked_b[x], ranked_b[y])
            (real if apart else noise).append((x, y))
    return RankingComparison(dataset, a_order, b_order, real, noise, (a.cache, b.cache))


def _apart(x: Ranked, y: Ranked) -> bool:
    """Whether two configurations' intervals do not overlap (without one: unknown, so no)."""
    bounds = (x.ci95_low_s, x.ci95_high_s, y.ci95_low_s, y.ci95_high_s)
    if any(v is None for v in bounds):
        return False
    return x.ci95_high_s < y.ci95_low_s or y.ci95_high_s < x.ci95_low_s


def rankings_table(comparisons: list[RankingComparison], a: ResultCard, b: ResultCard,
                   b_source: str) -> Table:  # fmt: skip
    """The comparison of two cards' rankings, one row per dataset both ranked."""
    rows = []
    for c in comparisons:
        order = "same" if c.same_order else f"differs from #{c.first_difference}"
        tau = f"{c.kendall_tau:.2f}" if c.kendall_tau is not None else "-"
        rows.append([c.dataset, str(len(c.a_order)), order, tau,
                     c.a_order[0] if c.a_order else "-", c.b_order[0] if c.b_order else "-",
                     _flips(c.real), _flips(c.noise)])  # fmt: skip
    notes = [
        "A flip is two configurations ranked one way in A and the other in B: a real "
        "disagreement when their 95% intervals are apart in both, within noise when they "
        "overlap in either (or a configuration has no interval: one repeat).",
        f"B's card: {b_source}.",
    ]
    for side, card, other in (("A", a, b), ("B", b, a)):
        alone = [ds for ds in card.rankings if ds not in other.rankings]
        if alone:
            notes.append(f"Ranked in {side} only: {', '.join(alone)}.")
    return Table("Comparison: rankings", ["dataset", "in both", "order", "Kendall tau",
                 "fastest (A)", "fastest (B)", "real flips", "flips within noise"], rows,
                 notes)  # fmt: skip


def _flips(pairs: list[tuple[str, str]]) -> str:
    return "; ".join(f"{x} vs {y}" for x, y in pairs) or "none"
