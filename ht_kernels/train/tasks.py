"""Conversations for self-distillation: tasks over long passages and code, multi-turn follow-ups, and the
built-in short prompts, as chat messages the frozen model answers.

`conversations(seed)` is the whole pool in a fixed order (shuffled by seed): every passage of the
documentation sources and every standard-library function of `corpus.functions` gets one task, drawn
from the families below, plus `builtin_prompts`. A conversation is a list of {"role", "content"}
messages ending with a user turn. Families:
- summarise: in one sentence, a few sentences, bullet points, N words, for a beginner, a TL;DR;
- extract: names, options, steps, numbers, definitions, as a list, a table or JSON;
- question: about the passage's title or its content, yes/no, why/when/how;
- rewrite: simpler, formal, as an FAQ, as quiz questions, as an email, explained to a child;
- continue: the first part of a passage, to be continued;
- translate: a paragraph into French, Spanish or German;
- title: a title, a headline, keywords;
- compare: two passages of one document;
- follow-up: the passage as an earlier assistant answer, then a follow-up request (multi-turn);
- code: explain, document, test, review, refactor or rewrite a standard-library function.
Passages sit before or after the instruction, with varied delimiters, so the drafts cannot key on one layout.
"""
from __future__ import annotations

import functools
import random

from ..drafts.prompts import builtin_prompts
from .corpus import SOURCES, Passage, functions, passages

SUMMARISE = [
    "Summarize the following text in one sentence.", "Summarize the following text in two or three sentences.",
    "Summarize the text below as a short list of bullet points.", "Give a summary of this text in about {n} words.",
    "Write a short summary of the passage for someone new to the topic.", "TL;DR of the following:",
    "Summarize the main ideas of this documentation section.", "What is the gist of the text below? Be brief.",
    "Condense this text into a single paragraph that keeps the most important details.",
    "Write a one-paragraph abstract of the following text.",
]
EXTRACT = [
    "List every function, command or option named in the text below.", "Extract the key terms from the text and "
    "define each in one line.", "List the steps the text describes, in order.", "What numbers, limits or "
    "versions does the text mention? List them with what they refer to.", "Extract the main claims of the text "
    "as a JSON list of strings.", "Make a table with two columns, term and meaning, from the text below.",
    "Which warnings or caveats does the text give? Quote or paraphrase each.", "List the names of all the "
    "objects, types or settings the passage talks about.",
]
QUESTION = [
    "According to the text, what is {title} about?", "What problem does {title} solve, according to the text?",
    "Based on the passage, when should someone use {title}?", "What does the documentation below say about "
    "{title}?", "Read the text and answer: what is the main point?", "Does the text mention any limitations? "
    "Answer yes or no, then explain.", "Using only the text below, explain how {title} works.",
    "What would a beginner find most confusing in this text, and how would you explain it?",
    "Answer from the passage: what are the two most important facts it states?",
]
REWRITE = [
    "Rewrite the following text in simpler words.", "Rewrite the text below in a more formal tone.",
    "Turn this text into an FAQ with three questions and their answers.", "Write four quiz questions, with "
    "answers, about the text below.", "Explain the following text to a ten-year-old.", "Rewrite this text as "
    "a short email to a colleague who asked about {title}.", "Turn the following passage into a numbered "
    "how-to guide.", "Rewrite the passage as a dialogue between a student and a teacher.",
]
CONTINUE = [
    "Continue the following text.", "Here is the beginning of a documentation page. Write the next paragraph.",
    "Continue this passage in the same style:",
]
TRANSLATE = ["Translate the following paragraph into {lang}.", "Please translate this text to {lang}:"]
LANGS = ["French", "Spanish", "German"]
TITLE = [
    "Suggest a good title for the text below.", "Write a headline and a one-line summary for this text.",
    "Give five keywords that describe the following text.",
]
COMPARE = [
    "Here are two passages from the same document. What do they have in common, and how do they differ?",
    "Read both texts and explain how the second one builds on the first.",
    "Summarize the two passages below together in a short paragraph.",
]
FOLLOW_ASK = [
    "Tell me about {title}.", "What does the documentation say about {title}?", "Can you explain {title}?",
    "I need information on {title}.",
]
FOLLOW_UP = [
    "Summarize that in two sentences.", "Can you give a concrete example?", "What should I watch out for?",
    "Explain it more simply.", "Make a bulleted list of the main points.", "Which part of that is the most "
    "important, and why?", "Can you shorten that to one paragraph?", "What are the related topics I should "
    "read about next?", "Turn that into three questions I could ask to test my understanding.",
]
CODE = [
    "Explain what this Python function does.", "Add a docstring to the following function.",
    "Write unit tests with pytest for this function.", "Review this code: are there any bugs or edge cases?",
    "Rewrite this function to be more readable, and explain your changes.", "Describe, step by step, what "
    "happens when this function is called.", "What are the inputs and the output of this function?",
    "Add type hints to this function.", "Explain this code to a beginner, line by line.",
    "Rewrite this function in JavaScript.",
]
LAYOUTS = ["{task}\n\n{text}", "{task}\n\nText:\n{text}", "{text}\n\n{task}", '{task}\n\n"""\n{text}\n"""',
           "Document:\n{text}\n\nInstruction: {task}", "{task}\n\n---\n{text}\n---"]
FAMILIES = {"summarise": 0.24, "extract": 0.12, "question": 0.16, "rewrite": 0.12, "continue": 0.08,
            "translate": 0.05, "title": 0.05, "compare": 0.06, "follow-up": 0.12}
BUILTIN = 1600        # the built-in short prompts (general tasks, questions, math, translation, code)


def conversations(seed: int = 0, docs: list[Passage] | None = None, code: list[Passage] | None = None,
                  builtin: int = BUILTIN) -> list[list[dict]]:
    """The pool, in its order for `seed`: a task for every passage of docs and every function of code, and
    `builtin` built-in short prompts. docs, code: None reads the installed sources (`corpus.passages` of
    every source, `corpus.functions`). Deterministic for a seed and the sources."""
    rng = random.Random(seed)
    docs = installed_sources()[0] if docs is None else docs
    code = installed_sources()[1] if code is None else code
    out = [_passage_task(rng, p, docs, i) for i, p in enumerate(docs)]
    out += [_code_task(rng, f) for f in code]
    out += [[_user(p)] for p in builtin_prompts(builtin, seed)]
    rng.shuffle(out)
    return out


@functools.lru_cache(maxsize=1)
def installed_sources() -> tuple[list[Passage], list[Passage]]:
    """(passages of every documentation source, standard-library functions), read once per process (~18 s):
    a training run loads its dataset's training and held-out parts from them."""
    return [p for name in sorted(SOURCES) for p in passages(name)], functions(min_lines=8)


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _passage_task(rng: random.Random, p: Passage, docs: list[Passage], i: int) -> list[dict]:
    family = rng.choices(list(FAMILIES), weights=list(FAMILIES.values()))[0]
    title, text = p.title or "this topic", p.text
    if family == "follow-up":
        ask = rng.choice(FOLLOW_ASK).format(title=title)
        return [_user(ask), {"role": "assistant", "content": text}, _user(rng.choice(FOLLOW_UP))]
    if family == "compare":
        j = neighbour(docs, i)
        if j is None:  # a one-passage document: summarise it instead
            family = "summarise"
        else:
            text = f"Passage 1:\n{text}\n\nPassage 2:\n{docs[j].text}"
            return [_user(f"{rng.choice(COMPARE)}\n\n{text}")]
    paras = text.split("\n\n")
    if family == "continue":
        if len(paras) < 2:
            words = text.split()
            text = " ".join(words[: len(words) // 2])
        else:
            text = "\n\n".join(paras[: max(1, len(paras) // 2)])
    elif family == "translate":
        text = min(paras, key=lambda x: abs(len(x.split()) - 80))
    pool = {"summarise": SUMMARISE, "extract": EXTRACT, "question": QUESTION, "rewrite": REWRITE,
            "continue": CONTINUE, "translate": TRANSLATE, "title": TITLE}[family]
    task = rng.choice(pool).format(title=title, n=rng.choice((30, 50, 80, 120)), lang=rng.choice(LANGS))
    return [_user(rng.choice(LAYOUTS).format(task=task, text=text))]


def neighbour(docs: list[Passage], i: int) -> int | None:
    """The index of the passage after docs[i] in its document, else the one before it, else None."""
    j = i + 1 if i + 1 < len(docs) and docs[i + 1].doc == docs[i].doc else i - 1
    return None if j < 0 or docs[j].doc != docs[i].doc else j


def _code_task(rng: random.Random, f: Passage) -> list[dict]:
    task = rng.choice(CODE)
    layout = rng.choice(["{task}\n\n```python\n{code}\n```", "```python\n{code}\n```\n\n{task}",
                         "{task} It is `{name}` from the Python standard library module `{module}`.\n\n{code}"])
    return [_user(layout.format(task=task, code=f.text, name=f.title, module=f.doc))]


def encode(tokenizer, messages: list[dict]) -> list[int]:
    """A conversation's token ids in the model's chat template, ready for the assistant's answer."""
    if tokenizer is None or not tokenizer.chat_template:
        raise ValueError("encode: conversations need a tokenizer with a chat template")
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
