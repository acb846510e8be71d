"""The demo's readability measure (``diffujax.readability``): word fraction and back-to-back
repeats on texts whose answers are counted by hand, and the repeat count against brute force."""

import itertools
import random

from diffujax.readability import longest_repeat, readability


def test_words_and_non_words():
    r = readability('The baker (well-known in town) said: "don\'t wait," and left.')
    assert r.pieces == 10 and r.word_fraction == 1.0 and r.repeats == 1 and r.doubled == 0
    assert r.readable()
    # what the old demo printed: one piece, not a word
    bad = readability("the______________________")
    assert bad.pieces == 1 and bad.word_fraction == 0.0 and not bad.readable()
    code = readability("def f(x): return x_1 + y__ == 3")
    assert code.pieces == 8 and code.word_fraction == 3 / 8  # def, return, 3
    assert not code.readable()
    assert readability("").pieces == 0 and not readability("   ").readable()
    assert not readability("Too short.").readable()  # fewer than 4 pieces


def test_repeats_of_one_to_eight_words():
    assert readability("the river the river the river flows").repeats == 3
    assert readability("and so it goes, goes, GOES. goes on").repeats == 4  # case, punctuation
    assert readability("one two three one two three one two three").repeats == 3
    # what the sampler of an under-trained model writes: a unit of four
    assert readability("there was a child, there was a child, there was a").repeats == 2
    assert readability("a child, there was a child, there was a child, there was").repeats == 3
    # a unit of nine is not counted
    assert readability(" ".join("abcdefghi" * 3)).repeats == 1
    text = "It was a very very cold night."
    assert readability(text).repeats == 2 and readability(text).readable()
    assert not readability("It was a very very very cold night.").readable()


def test_doubled_words():
    # what the demo's sampler wrote after 40 steps: a unit never repeats 3x, but words double
    text = ("and the lamb and the the priest are the the only the two the people are the the"
            " only the.")
    r = readability(text)
    assert r.repeats == 2 and r.doubled == 3 and r.word_fraction == 1.0 and not r.readable()
    assert readability("He had had enough, that is all.").doubled == 1


def brute_force_repeats(items, max_unit):
    """The largest k such that some unit of 1..max_unit items occurs k times in a row."""
    best = min(1, len(items))
    for start, p in itertools.product(range(len(items)), range(1, max_unit + 1)):
        unit, k = items[start:start + p], 1
        if len(unit) < p:
            continue
        while items[start + k * p:start + (k + 1) * p] == unit:
            k += 1
        best = max(best, k)
    return best


def test_longest_repeat_equals_brute_force():
    draw = random.Random(0)
    for _ in range(500):
        items = [draw.choice("ab") if draw.random() < 0.7 else draw.choice("abcd")
                 for _ in range(draw.randrange(0, 14))]
        for max_unit in (1, 2, 3, 8):
            assert longest_repeat(items, max_unit) == brute_force_repeats(items, max_unit), items
