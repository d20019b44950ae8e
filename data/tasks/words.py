"""Word lists and the seeded filler-sentence stream used as haystack by every generator.

Imports nothing from this project."""
from __future__ import annotations

import random

ADJECTIVES = ("quiet bright ancient narrow golden hollow gentle crimson distant frozen silver rusty "
              "humble hidden restless silent wooden patient vivid brittle dusty clever lonely tidy "
              "stormy amber hungry careful sleepy rapid swift fragile sturdy modest eager polished").split()
NOUNS = ("harbor lantern meadow river orchard bridge village tower garden valley canyon forest "
         "market island cabin workshop library chapel mill pond quarry station tavern fountain "
         "courtyard cellar ridge glacier marsh vineyard lighthouse barn kiln monastery ferry").split()
VERBS = ("watches guards overlooks borders shelters faces follows crosses surrounds hides "
         "reflects approaches outlasts echoes supplies feeds").split()
PEOPLE = ("the farmer the sailor the painter the miller the teacher the baker the clerk the weaver "
          "the mason the courier the fisher the potter the tailor the scribe the smith").split(" the ")
ACTIONS = ("repaired the fence", "counted the barrels", "wrote a long letter", "sang an old song",
           "carried water uphill", "mended a torn net", "planted young trees", "painted the door",
           "fed the restless geese", "swept the quiet yard", "sorted dusty papers", "lit the stove")
TIMES = ("at dawn", "before noon", "in the evening", "after the storm", "during the festival",
         "every spring", "late at night", "on market day", "in midwinter", "at harvest time")
COMMON_WORDS = ("apple anchor badge basket blanket bottle bucket candle carpet castle chimney cloud "
                "compass copper cradle crystal curtain dagger desert diamond doorway dragon engine "
                "feather fiddle flag flute fossil galaxy garlic glove goblet hammer helmet honey "
                "jacket jungle kettle ladder lemon magnet marble mirror needle oyster paddle parrot "
                "pepper pillow planet pocket puzzle quill rabbit ribbon saddle scarf shovel spider "
                "spoon stable statue sugar tablet teapot thimble ticket tunnel velvet violin wagon "
                "walnut whistle window wizard yarn zipper").split()
SYLLABLES = ("ka lo mi ra ten vo zu bel dor fin gal hor ist jun kel mor nar oth pel quin ros sul "
             "tav ul ver wen xan yor zel").split()


def filler_sentence(rng: random.Random) -> str:
    """One varied, content-free sentence."""
    if rng.random() < 0.5:
        return (f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
                f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}.")
    person = rng.choice(PEOPLE).removeprefix("the ")
    return f"{rng.choice(TIMES).capitalize()}, the {person} {rng.choice(ACTIONS)} near the {rng.choice(NOUNS)}."


def filler(key: str, count: int) -> list[str]:
    """The first `count` sentences of the stream seeded by `key` (a prefix of any longer call)."""
    rng = random.Random(f"{key}|filler")
    return [filler_sentence(rng) for _ in range(count)]


def invented_name(rng: random.Random, syllables: int = 2) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()


def insert_at_depths(units: list[str], inserts: list[tuple[float, str]]) -> list[str]:
    """Insert each text at its depth in [0, 1] of `units` (stable for equal depths)."""
    out = list(units)
    for depth, text in sorted(inserts, key=lambda x: x[0], reverse=True):
        out.insert(round(depth * len(units)), text)
    return out


REPEATED = ("The lake is still.", "The hills are green.", "The road runs east.", "Clouds drift slowly.",
            "The day goes on.")
JOINERS = {"prose": " ", "repeat": " ", "code": "\n", "json": "\n"}


def code_line(rng: random.Random) -> str:
    """One line of made-up Python-like code."""
    a, b = rng.choice(ADJECTIVES), rng.choice(NOUNS)
    n = rng.randint(2, 999)
    return rng.choice((f"def {a}_{b}(x):", f"    return x * {n} + len({b}s)", f"{b}_count = {n}",
                       f"for item in {a}_{b}s: total += item.{rng.choice(NOUNS)}",
                       f"if {b}.{a} > {n}: break", f"# {rng.choice(VERBS)} the {b} before the {rng.choice(NOUNS)}",
                       f"{a}_{b} = load('{rng.choice(NOUNS)}', retries={n % 7})"))


def json_line(rng: random.Random) -> str:
    """One line of made-up JSON records."""
    return (f'{{"id": {rng.randint(100, 99999)}, "name": "{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}", '
            f'"tags": ["{rng.choice(NOUNS)}", "{rng.choice(NOUNS)}"], "active": {rng.choice(("true", "false"))}}}')


def haystack(kind: str, key: str, count: int) -> list[str]:
    """`count` filler units of one kind, seeded by `key`; `prose` is `filler` (the classic stream)."""
    if kind == "prose":
        return filler(key, count)
    if kind == "repeat":
        return [REPEATED[i % len(REPEATED)] for i in range(count)]
    rng = random.Random(f"{key}|filler|{kind}")
    line = {"code": code_line, "json": json_line}[kind]
    return [line(rng) for _ in range(count)]


def join_units(kind: str, units: list[str]) -> str:
    return JOINERS[kind].join(units)
