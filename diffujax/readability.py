"""A cheap, measurable stand-in for "a person would call this text": mostly words, no unit of one
to eight words repeated three times back to back and hardly a word doubled (what degenerate
sampling produces: ``the______``, ``a child, a child, a child``, ``the the only the``).
``diffujax demo`` prints it beside its sample and infill."""

from __future__ import annotations

import dataclasses
import re

# A word: letters or digits, inner apostrophes / hyphens allowed, with ordinary punctuation
# around it ("(well-known)," and "don't." are words; "the____" and "=>" are not).
_WORD = re.compile(r"""^[("'\[]*[A-Za-z0-9]+(?:['\u2019-][A-Za-z0-9]+)*[.,;:!?"')\]]*$""")
_EDGES = "\"'()[].,;:!?"
MAX_UNIT = 8  # repeated units of up to this many words are counted


@dataclasses.dataclass(frozen=True)
class Readability:
    pieces: int  # whitespace-separated pieces of the text
    word_fraction: float  # of the pieces that are words (_WORD); 0 for no pieces
    repeats: int  # most back-to-back copies of a unit of 1..MAX_UNIT pieces (1: none repeated)
    doubled: int  # pieces equal to the piece before them ("the the"; rare in written text)

    def readable(self) -> bool:
        return (self.pieces >= 4 and self.word_fraction >= 0.8 and self.repeats <= 2
                and self.doubled <= 1)

    def __str__(self) -> str:
        verdict = "readable" if self.readable() else "NOT readable"
        return (f"{verdict}: {self.word_fraction:.0%} of {self.pieces} pieces are words, a unit"
                f" repeats at most {self.repeats}x back to back, {self.doubled} doubled")


def longest_repeat(items, max_unit: int = MAX_UNIT) -> int:
    """Most back-to-back copies of any unit of ``1..max_unit`` consecutive items: a stretch in
    which ``items[i] == items[i - p]`` throughout, ``s`` items long, holds ``(s + p) // p``
    copies of its unit of ``p``. 1 when nothing repeats, 0 for no items."""
    best = min(1, len(items))
    for p in range(1, max_unit + 1):
        stretch = 0
        for i in range(p, len(items)):
            stretch = stretch + 1 if items[i] == items[i - p] else 0
            best = max(best, (stretch + p) // p)
    return best


def readability(text: str) -> Readability:
    pieces = text.split()
    words = sum(bool(_WORD.match(piece)) for piece in pieces)
    normalised = [piece.strip(_EDGES).lower() for piece in pieces]
    doubled = sum(a == b for a, b in zip(normalised, normalised[1:]))
    return Readability(pieces=len(pieces), word_fraction=words / len(pieces) if pieces else 0.0,
                       repeats=longest_repeat(normalised), doubled=doubled)
