"""Creature attributes, the prompt template over them, and the prompt vocabulary (small and listed on purpose)."""
from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": ("red", "orange", "yellow", "green", "blue", "purple"),
    "shape": ("round", "square", "triangle", "cross"),
    "eyes": ("one", "two", "three"),
    "size": ("small", "big"),
    "position": ("left", "centre", "right"),
    "background": ("dark", "light", "grassy", "sky"),
}
_EYE_WORD = {"one": "eye", "two": "eyes", "three": "eyes"}
_POSITION_PHRASE = {"left": "on the left", "centre": "in the centre", "right": "on the right"}


@dataclass(frozen=True)
class Creature:
    color: str
    shape: str
    eyes: str
    size: str
    position: str
    background: str

    def prompt(self) -> str:
        """'a big blue round creature with two eyes on the left , dark background' (the comma is its own word)."""
        return (f"a {self.size} {self.color} {self.shape} creature with {self.eyes} {_EYE_WORD[self.eyes]} "
                f"{_POSITION_PHRASE[self.position]} , {self.background} background")

    def to_dict(self) -> dict:
        return asdict(self)


def all_creatures() -> list[Creature]:
    """Every attribute combination once (what the teacher and the probes train on)."""
    names = list(ATTRIBUTES)
    return [Creature(**dict(zip(names, values))) for values in itertools.product(*ATTRIBUTES.values())]


def sample_creatures(n: int, seed: int) -> list[Creature]:
    rng = random.Random(seed)
    return [Creature(**{name: rng.choice(values) for name, values in ATTRIBUTES.items()}) for _ in range(n)]


def vocabulary() -> list[str]:
    """Every word any prompt can contain (the tokenizer's vocabulary)."""
    words = {"a", "creature", "with", "eye", "eyes", "on", "the", "in", ",", "background"}
    for values in ATTRIBUTES.values():
        words.update(values)
    return sorted(words)
