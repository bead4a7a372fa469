"""German text to translate into English, for self-distillation: the drafts learn what the model does with
a foreign-language input, which neither the documentation nor the open-ended pool holds.

`conversations(seed)` is the whole pool in a fixed order (shuffled by seed): the German texts
(`corpus.german_texts`: sayings, quotations, anecdotes, jokes) in a seeded order, taken one to three
at a time as one input, each input with a request to translate it (most), to translate and explain it, or
to explain its meaning in English.
"""
from __future__ import annotations

import random

from .corpus import german_texts
from .tasks import _user

TRANSLATE = [
    "Translate German to English: {text}", "Translate the following German text into English.\n\n{text}",
    "Translate into English: {text}", "Translate this from German to English:\n{text}",
    "Please translate to English: {text}", "{text}\n\nTranslate the German text above into English.",
    "What is the English translation of this German text?\n\n{text}", "German: {text}\nEnglish:",
]
EXPLAIN = [
    "Translate this German text into English, then explain what it means.\n\n{text}",
    "What does this German text mean? Answer in English.\n\n{text}",
    "Explain the meaning of the following German saying in English: {text}",
]
FAMILIES = {"translate": (0.8, TRANSLATE), "explain": (0.2, EXPLAIN)}


def conversations(seed: int = 0, texts: list[str] | None = None) -> list[list[dict]]:
    """The pool, in its order for `seed`: every text of `texts` (None: `corpus.german_texts()`) exactly once,
    one to three consecutive texts of a seeded order per prompt. Deterministic for a seed and the texts."""
    rng = random.Random(seed)
    texts = german_texts() if texts is None else list(texts)
    rng.shuffle(texts)
    out, i = [], 0
    while i < len(texts):
        n = rng.choices((1, 2, 3), weights=(0.5, 0.3, 0.2))[0]
        family = rng.choices(list(FAMILIES), weights=[w for w, _ in FAMILIES.values()])[0]
        out.append([_user(rng.choice(FAMILIES[family][1]).format(text=" ".join(texts[i:i + n])))])
        i += n
    return out
