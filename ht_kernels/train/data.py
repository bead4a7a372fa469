"""Training data for the draft heads: the frozen model's own answers to prompts the project writes itself.

`drafts.prompts.builtin_prompts` gives the prompts; `synthesize` answers them with the frozen model in
batches (greedy by default, so the data is what greedy decoding will meet). `reading_prompts` asks for
summaries of the model's own answers (long inputs). `load_jsonl` reads the user's own data:
{"prompt": ...} or {"turns": [...]} rows are answered by the model, {"text": ...} rows are used as they are.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..decode.decoder import HiddenTransferDecoder
from ..decode.replay import answers
from ..drafts.examples import Example
from ..drafts.prompts import jsonl_rows

READING_TASKS = [
    "Summarize: {text}", "Summarize the following article in a few sentences.\n\n{text}",
    "{text}\nWhat is this text mainly about?", "{text}\nAccording to the text, what are the most important facts?",
    "Read the passage and answer the question.\n\n{text}\n\nQuestion: what does the passage say, and why does it matter?",
    "{text}\nWhat are the key points of the passage above? Answer as a short list.",
]


def reading_prompts(texts: list[str], n: int, seed: int = 0) -> list[str]:
    """n prompts (with `seed`) that ask to summarise, or answer a question about, texts the model wrote
    (its answers to the built-in prompts): long inputs like articles and retrieved documents."""
    rng = random.Random(seed)
    texts = [t.strip() for t in texts if len(t.split()) >= 60]
    if n > len(texts):
        raise ValueError(f"reading_prompts: n must be at most {len(texts)} (texts of 60+ words), got {n}")
    return [rng.choice(READING_TASKS).format(text=t) for t in rng.sample(texts, n)]


def load_jsonl(path: str | Path, vocab_size: int | None = None) -> tuple[list[str], list[str], list[list[int]]]:
    """Rows {"prompt": str} / {"turns": [str, ...]} (answered by the model), {"text": str} and
    {"tokens": [int, ...]} (used as they are; ids below vocab_size when it is given) -> (prompts, texts,
    token lists). A row that is none of these raises a ValueError naming path:line."""
    prompts, texts, seqs = [], [], []
    for i, row in jsonl_rows(path):
        toks = row.get("tokens")
        if toks is not None:
            if (not isinstance(toks, list) or not toks
                    or not all(isinstance(t, int) and not isinstance(t, bool) for t in toks)):
                raise ValueError(f"{path}:{i}: 'tokens' must be a non-empty list of integer token ids, got {toks!r:.80}")
            if vocab_size is not None and not 0 <= min(toks) <= max(toks) < vocab_size:
                bad = next(t for t in toks if not 0 <= t < vocab_size)
                raise ValueError(f"{path}:{i}: token id {bad} is outside the model's vocabulary [0, {vocab_size})")
            seqs.append(toks)
        elif isinstance(row.get("text"), str):
            texts.append(row["text"])
        elif isinstance(row.get("prompt"), str):
            prompts.append(row["prompt"])
        elif isinstance(row.get("turns"), list) and row["turns"] and isinstance(row["turns"][0], str):
            prompts.append(row["turns"][0])
        else:
            raise ValueError(f"{path}:{i}: a data row needs a 'prompt' string, 'turns' of strings, a 'text' string "
                             f"or 'tokens', got {json.dumps(row)[:80]}")
    if not prompts and not texts and not seqs:
        raise ValueError(f"{path}: no data rows")
    return prompts, texts, seqs


def synthesize(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 32,
               temperature: float = 0.0, seed: int = 0, eos_token_id=None, progress=None) -> list[Example]:
    """The model's own answers to the encoded prompts (`decode.replay.answers`), decoded with the model's
    execution settings as they are (prepacked weights, row-exact). eos_token_id: as for `generate`."""
    dec = HiddenTransferDecoder(model, transfer=None, prepack=model.prepacked, exact=model.row_exact)
    return answers(dec, prompts, max_new_tokens, batch_size, temperature, seed, eos_token_id, progress)


def windows(example: Example, max_len: int) -> list[Example]:
    """Split a sequence longer than max_len into consecutive windows of at most max_len tokens (the first
    keeps the example's start, the others train from their first token)."""
    toks = example.tokens
    if len(toks) <= max_len:
        return [example]
    return [Example(toks[s:s + max_len], example.start if s == 0 else 0) for s in range(0, len(toks), max_len)]
