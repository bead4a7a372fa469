"""Training data for the draft heads: the frozen model's own answers to prompts the project writes itself.

`builtin_prompts` crosses task templates with topics (writing, explanation, advice, reasoning, math,
code, extraction, summarisation, translation, role play); none comes from an evaluation set.
`synthesize` answers them with the frozen model in batches (greedy by default, so the data is what
greedy decoding will meet). `load_jsonl` reads the user's own data: {"prompt": ...} or {"turns": [...]}
rows are answered by the model, {"text": ...} rows are used as they are.
"""
from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

TOPICS = [
    "the water cycle", "black holes", "photosynthesis", "the French Revolution", "machine learning",
    "climate change", "the human immune system", "electric cars", "the stock market", "volcanoes",
    "the Roman Empire", "renewable energy", "sleep", "coffee", "honey bees", "the internet", "chess",
    "a small bakery", "public libraries", "the moon landing", "recycling", "vaccines", "jazz music",
    "the Great Wall of China", "earthquakes", "social media", "healthy breakfast", "learning a language",
    "remote work", "the printing press", "rainforests", "time management", "a city park", "solar panels",
    "the Olympic Games", "dinosaurs", "friendship", "budget travel", "urban gardening", "the ocean floor",
    "artificial satellites", "ancient Egypt", "running a marathon", "board games", "the piano",
    "bicycles", "a rainy day", "starting a podcast", "desert animals", "the printing of money",
]
TASKS = [
    "Write a short story about {topic}.", "Write a poem about {topic}.", "Explain {topic} to a ten-year-old.",
    "Explain {topic} in detail.", "Give five interesting facts about {topic}.", "What are the pros and cons of {topic}?",
    "Write a blog post about {topic}.", "Write a persuasive essay about {topic}.",
    "Give me practical tips related to {topic}.", "Write an email to a friend about {topic}.",
    "Summarize the history of {topic}.", "What are common misconceptions about {topic}?",
    "Write a dialogue between two people discussing {topic}.", "Create a quiz with answers about {topic}.",
    "Imagine you are a tour guide. Describe {topic} to visitors.", "Describe {topic} as a news report.",
    "Write a product description inspired by {topic}.", "How would you teach a class about {topic}?",
    "Compare {topic} and {other}.", "What is the connection between {topic} and {other}?",
    "Write a speech about {topic} for a school assembly.", "List the key terms about {topic} with definitions.",
    "Translate into French: 'I would like to learn more about {topic}.' Then explain the grammar.",
    "Write a haiku and a limerick about {topic}.", "What questions should a beginner ask about {topic}?",
]
MATH = [
    "A shop sells {a} apples for {b} dollars. How much do {c} apples cost? Explain step by step.",
    "Solve for x: {a}x + {b} = {c}. Show your work.", "What is {a} multiplied by {b}, plus {c}? Explain.",
    "A train travels {a} km in {b} hours. What is its average speed, and how far does it go in {c} hours?",
    "Tom has {a} marbles, gives away {b} and then buys {c} more. How many does he have? Think step by step.",
    "Find the area and perimeter of a rectangle that is {a} cm by {b} cm.",
    "What is {c} percent of {a}? Explain how to compute it.",
]
CODE = [
    "Write a Python function that {job}.", "Write a JavaScript function that {job}.",
    "Explain how to write a program that {job}, then give the code.", "Write a C function that {job}.",
    "Write a Python class with a method that {job}, and a short usage example.",
]
JOBS = [
    "reverses a string", "checks whether a number is prime", "sorts a list with merge sort",
    "counts the words in a text", "finds the largest element of a list", "computes the factorial of n",
    "removes duplicates from a list", "checks whether a string is a palindrome", "converts Celsius to Fahrenheit",
    "merges two sorted lists", "computes the average of a list of numbers", "finds the second smallest number",
    "parses a date string", "reads a CSV file and sums a column", "implements binary search",
]
PASSAGE_TASKS = [
    "Summarize the following text in two sentences.\n\n{passage}",
    "Extract every number mentioned in the text below, with what it refers to.\n\n{passage}",
    "Read the text and answer: what is the main point?\n\n{passage}",
    "Rewrite the following text in a more formal tone.\n\n{passage}",
]
PASSAGES = [
    "The town council met on Tuesday to discuss the new bridge. The project will cost 4 million dollars and "
    "take two years. Residents asked for a bicycle lane, and the council agreed to study the idea by March.",
    "Our bakery opened in 2015 with three employees. Today we have twelve, bake 800 loaves a day and deliver "
    "to five cafes. Next year we plan to add a second oven and start selling online.",
    "The hiking trail is 12 kilometres long and climbs 600 metres. It starts at the old mill, passes two "
    "lakes and ends at a hut where hikers can stay overnight for 30 euros.",
    "In the experiment, 40 plants were given extra light and 40 were not. After six weeks the first group "
    "was on average 5 centimetres taller, but its leaves were paler.",
    "The library will close for renovation from June to August. During this time books can be returned at "
    "the town hall, and the children's reading club will meet in the community centre every Saturday.",
    "The company sold 1.2 million phones last quarter, 15 percent more than a year before. Profits rose less, "
    "because the price of memory chips doubled.",
]


@dataclass
class Example:
    """One training sequence: tokens (prompt + answer) and start, the first anchor that is trained
    (the prompt's last token for generated answers, 0 for plain text)."""

    tokens: list[int]
    start: int


def builtin_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct prompts drawn (with `seed`) from the templates, about 60% general tasks and 40% math,
    code and passage tasks."""
    rng = random.Random(seed)
    general = [t.format(topic=a, other=b) for t in TASKS for a, b in zip(TOPICS, TOPICS[7:] + TOPICS[:7])]
    math = [t.format(a=a, b=b, c=c) for t in MATH for a, b, c in itertools.product((3, 12, 45, 120), (4, 7, 30), (5, 9, 16))]
    code = [t.format(job=j) for t in CODE for j in JOBS]
    passage = [t.format(passage=p) for t in PASSAGE_TASKS for p in PASSAGES]
    general, math, code, passage = (list(dict.fromkeys(pool)) for pool in (general, math, code, passage))
    for pool in (general, math, code, passage):
        rng.shuffle(pool)
    special = math + code + passage
    rng.shuffle(special)
    n_special = min(len(special), (2 * n) // 5)
    if n - n_special > len(general):
        raise ValueError(f"builtin_prompts: n must be at most {len(general) + n_special}, got {n}")
    prompts = general[: n - n_special] + special[:n_special]
    rng.shuffle(prompts)
    return prompts


def load_jsonl(path: str | Path) -> tuple[list[str], list[str], list[list[int]]]:
    """Rows {"prompt": str} / {"turns": [str, ...]} (answered by the model), {"text": str} and
    {"tokens": [int, ...]} (used as they are) -> (prompts, texts, token lists)."""
    prompts, texts, seqs = [], [], []
    for i, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if isinstance(row.get("tokens"), list):
            seqs.append([int(x) for x in row["tokens"]])
        elif isinstance(row.get("text"), str):
            texts.append(row["text"])
        elif isinstance(row.get("prompt"), str):
            prompts.append(row["prompt"])
        elif isinstance(row.get("turns"), list) and row["turns"]:
            prompts.append(str(row["turns"][0]))
        else:
            raise ValueError(f"{path}:{i}: a data row needs 'prompt', 'turns', 'text' or 'tokens', got keys "
                             f"{sorted(row)}")
    if not prompts and not texts and not seqs:
        raise ValueError(f"{path}: no data rows")
    return prompts, texts, seqs


def synthesize(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 32,
               temperature: float = 0.0, seed: int = 0, eos_token_id=None, progress=None) -> list[Example]:
    """The model's own answers to the encoded prompts, in batches of similar length (plain decoding).
    Returns one Example per prompt: prompt + answer, trained from the prompt's last token."""
    from ..decode.decoder import HiddenTransferDecoder

    dec = HiddenTransferDecoder(model, transfer=None)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Example | None] = [None] * len(prompts)
    gen = torch.Generator(model.device).manual_seed(seed)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        res = dec.generate_ar([prompts[i] for i in idx], max_new_tokens=max_new_tokens, temperature=temperature,
                              generator=gen, eos_token_id=eos_token_id)
        for i, new in zip(idx, res.sequences):
            out[i] = Example(prompts[i] + new, len(prompts[i]) - 1)
        if progress is not None:
            progress(len(idx))
    return out


def windows(example: Example, max_len: int) -> list[Example]:
    """Split a sequence longer than max_len into consecutive windows of at most max_len tokens (the first
    keeps the example's start, the others train from their first token)."""
    toks = example.tokens
    if len(toks) <= max_len:
        return [example]
    return [Example(toks[s:s + max_len], example.start if s == 0 else 0) for s in range(0, len(toks), max_len)]
