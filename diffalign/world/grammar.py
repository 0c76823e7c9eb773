"""The caption grammar of the shapes world: generate, render to text, and parse back.

A caption is one or two object phrases, an optional relation between them, and an optional
background, e.g. "two red circles left of a blue square on a white background":

    caption  := phrase [relation phrase] [" on a(n) " colour " background"]
    phrase   := count colour shape            ("a" / "an" / "one" = 1, "two", "three")
    relation := "left of" | "right of" | "above" | "below"

At most four objects in all; the background colour is never an object's colour; the two phrases
of a caption never share both colour and shape. ``parse_caption(str(c)) == c`` for every caption
the generator makes, and the parser accepts "one" as well as "a"/"an".
"""

from __future__ import annotations

import random
from dataclasses import dataclass

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
MAX_OBJECTS = 4
SPLITS: tuple[str, ...] = ("train", "validation", "heldout")  # assigned in render.split_of
_NUMBER = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class CaptionError(ValueError):
    """A caption outside the shapes-world grammar."""


@dataclass(frozen=True)
class ObjectPhrase:
    """``count`` objects of one colour and shape."""

    count: int
    colour: str
    shape: str

    def __str__(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        if self.count == 1:
            return f"{_article(self.colour)} {self.colour} {noun}"
        return f"{COUNT_WORDS[self.count]} {self.colour} {noun}"


@dataclass(frozen=True)
class Caption:
    """A parsed caption: one or two phrases, the relation between them, the background."""

    objects: tuple[ObjectPhrase, ...]
    relation: str | None = None
    background: str | None = None

    def __post_init__(self) -> None:
        validate(self)

    def __str__(self) -> str:
        text = str(self.objects[0])
        if self.relation is not None:
            text += f" {self.relation} {self.objects[1]}"
        if self.background is not None:
            text += f" on {_article(self.background)} {self.background} background"
        return text

    @property
    def num_objects(self) -> int:
        """Total number of objects the caption asks for."""
        return sum(phrase.count for phrase in self.objects)

    def combination_key(self) -> tuple:
        """What the data splits hold out: the colour-shape pairs with their relation (two-phrase
        captions), or colour, shape, count and background (one-phrase captions)."""
        if self.relation is not None:
            a, b = self.objects
            return ("pair", a.colour, a.shape, self.relation, b.colour, b.shape)
        (only,) = self.objects
        return ("single", only.colour, only.shape, only.count, self.background)


OPPOSITE_RELATION: dict[str, str] = {
    "left of": "right of", "right of": "left of", "above": "below", "below": "above",
}  # fmt: skip


def flip_relation(caption: Caption) -> Caption:
    """The same caption with the opposite relation (one-phrase captions come back unchanged)."""
    if caption.relation is None:
        return caption
    return Caption(caption.objects, OPPOSITE_RELATION[caption.relation], caption.background)


def validate(caption: Caption) -> None:
    """Raise ``CaptionError`` when ``caption`` breaks a rule of the grammar."""
    phrases = caption.objects
    if len(phrases) not in (1, 2):
        raise CaptionError(f"A caption has one or two object phrases, got {len(phrases)}.")
    if (len(phrases) == 2) != (caption.relation is not None):
        raise CaptionError("Two object phrases need a relation between them, and one needs none.")
    if caption.relation is not None and caption.relation not in RELATIONS:
        raise CaptionError(f"Unknown relation {caption.relation!r}; use one of {RELATIONS}.")
    for phrase in phrases:
        if phrase.colour not in COLOURS or phrase.shape not in SHAPES:
            raise CaptionError(f"Unknown colour or shape in {phrase}.")
        if phrase.count not in COUNT_WORDS:
            raise CaptionError(f"Counts run from 1 to 3, got {phrase.count}.")
    if caption.num_objects > MAX_OBJECTS:
        raise CaptionError(f"At most {MAX_OBJECTS} objects, got {caption.num_objects}.")
    if len(phrases) == 2 and (phrases[0].colour, phrases[0].shape) == (
        phrases[1].colour,
        phrases[1].shape,
    ):
        raise CaptionError("The two phrases must differ in colour or shape.")
    if caption.background is not None:
        if caption.background not in COLOURS:
            raise CaptionError(f"Unknown background colour {caption.background!r}.")
        if caption.background in {p.colour for p in phrases}:
            raise CaptionError("The background colour must differ from every object's colour.")


def _parse_phrase(words: list[str], text: str) -> ObjectPhrase:
    if len(words) != 3 or words[0] not in _NUMBER:
        raise CaptionError(
            f"Cannot read an object phrase in {text!r}: expected 'count colour shape'."
        )
    count, colour, noun = _NUMBER[words[0]], words[1], words[2]
    shape = noun[:-1] if count > 1 and noun.endswith("s") else noun
    if (count > 1) != noun.endswith("s") or shape not in SHAPES:
        raise CaptionError(f"Cannot read the shape {noun!r} (count {count}) in {text!r}.")
    article_ok = words[0] != "an" or colour[0] in "aeiou"
    if not article_ok:
        raise CaptionError(f"'an' goes before a vowel only, in {text!r}.")
    return ObjectPhrase(count, colour, shape)


def parse_caption(text: str) -> Caption:
    """Parse a caption of the grammar; raises ``CaptionError`` naming what could not be read."""
    words = text.strip().lower().rstrip(".").split()
    background = None
    if (
        len(words) >= 4
        and words[-4] == "on"
        and words[-3] in ("a", "an")
        and words[-1] == "background"
    ):
        background, words = words[-2], words[:-4]
    if len(words) == 3:
        return Caption((_parse_phrase(words, text),), None, background)
    relation = next((r for r in RELATIONS if words[3 : 3 + len(r.split())] == r.split()), None)
    if relation is None:
        raise CaptionError(
            f"Cannot parse caption {text!r}: after the first object phrase expected one of "
            f"{RELATIONS} or 'on a <colour> background'."
        )
    right = words[3 + len(relation.split()) :]
    phrases = (_parse_phrase(words[:3], text), _parse_phrase(right, text))
    return Caption(phrases, relation, background)


def random_caption(
    rng: random.Random, p_two_phrases: float = 0.5, p_background: float = 0.4
) -> Caption:
    """Draw a caption from the grammar with the world's default proportions."""
    colour_shapes = [(c, s) for c in COLOURS for s in SHAPES]
    if rng.random() < p_two_phrases:
        (ca, sa), (cb, sb) = rng.sample(colour_shapes, 2)
        na = rng.randint(1, 3)
        nb = rng.randint(1, min(3, MAX_OBJECTS - na))
        phrases = (ObjectPhrase(na, ca, sa), ObjectPhrase(nb, cb, sb))
        relation = rng.choice(RELATIONS)
    else:
        colour, shape = rng.choice(colour_shapes)
        phrases, relation = (ObjectPhrase(rng.randint(1, 3), colour, shape),), None
    background = None
    if rng.random() < p_background:
        used = {p.colour for p in phrases}
        background = rng.choice([c for c in COLOURS if c not in used])
    return Caption(phrases, relation, background)
