"""Open-ended conversations for self-distillation, beside the documentation and code tasks of `tasks`:
narrative reading, writing about places and ideas, and word problems, the kinds of requests a chat model
gets most and the documentation pool lacks.

`conversations(seed)` is the whole pool in a fixed order (shuffled by seed). Families:
- narrative: a task for every passage of the King James Bible (`corpus.kjv_passages`): summarise, retell
  (modern English, a news report, a story for children, a dialogue), question, extract, continue, title,
  translate, compare (two passages of one book), follow-up (the passage as an earlier assistant answer);
- places: a prompt for every city of the time-zone database and two for every country (`corpus.places`):
  travel, history, culture, food, stories, letters, a tour guide's role, news reports, comparisons;
- concepts: a prompt for each of `concepts` words of the word list (`corpus.words`), drawn with the seed:
  meanings, poems, essays, stories, dialogues, analogies, the difference between two words;
- problems: `problems` generated word problems (multi-step arithmetic, rates, money, geometry,
  percentages, equations) and ordering puzzles, their names and numbers drawn with the seed.
"""
from __future__ import annotations

import random

from .corpus import Passage, kjv_passages, places, words
from .tasks import FOLLOW_UP, LANGS, LAYOUTS, SUMMARISE, _user, neighbour

NARRATIVE = {
    "summarise": (0.22, SUMMARISE[:2] + SUMMARISE[4:6] + [
        "Summarize this passage in plain modern English.", "Summarize the events of this passage as bullet points.",
        "In three sentences, what happens in the passage below?"]),
    "retell": (0.16, [
        "Retell this passage in modern English.", "Rewrite the following passage as a short news report.",
        "Retell the passage below as a story for children.", "Rewrite this passage as a dialogue between the "
        "people in it.", "Paraphrase the following passage in simple words.", "Rewrite the passage as a diary "
        "entry by one of the people in it."]),
    "question": (0.16, [
        "Who are the people named in this passage, and what does each of them do?", "According to the passage, "
        "what happens in {title}?", "What is the main lesson of this passage?", "Where does the passage take "
        "place, and what happens there?", "Answer from the passage: what are the two most important things it "
        "says?", "Explain the meaning of this passage and its historical context.", "What would this passage "
        "mean to a modern reader?"]),
    "extract": (0.1, [
        "List every person and place named in the passage.", "List the events of the passage in order.",
        "Make a table of the people in the passage and what they do.", "Extract the numbers the passage "
        "mentions, with what they count, as a JSON list.", "Quote the three most important sentences of the "
        "passage and explain each."]),
    "continue": (0.08, ["Continue the following passage in the same style.",
                        "Here is the beginning of a story. Write what happens next."]),
    "title": (0.05, ["Suggest a title for this passage.", "Write a headline and a one-line summary for this "
                     "passage.", "Give five keywords that describe the following passage."]),
    "translate": (0.05, ["Translate the following passage into {lang}.", "Translate this text to {lang}:"]),
    "compare": (0.06, ["Here are two passages from the same book. How does the second follow from the first?",
                       "Summarize the two passages below together in a short paragraph."]),
    "follow-up": (0.12, ["Tell me the story of {title}.", "What happens in {title}?", "Can you tell me about "
                         "{title}?"]),
}
CITY = [
    "Write a travel blog post about a weekend in {city}, {country}.", "Plan a three-day itinerary for a first "
    "visit to {city}.", "You are a tour guide in {city}. Greet a group of tourists and describe the first stop "
    "of the tour.", "Give a brief history of {city}.", "Write a short story set in {city}.", "Write a letter to "
    "a friend about your first week living in {city}, {country}.", "Write a short news report about a festival "
    "held in {city}.", "What is the climate like in {city}, and when is the best time to visit?", "Describe a "
    "typical day for a student living in {city}.", "What should a business traveller know before a trip to "
    "{city}?",
]
COUNTRY = [
    "What is {country} known for?", "Describe the geography and the climate of {country}.", "Give a short "
    "history of {country} in five sentences.", "What languages are spoken in {country}?", "What is the capital "
    "of {country}, and what is it like?", "Write a persuasive paragraph that invites tourists to visit "
    "{country}.", "Name five traditional dishes from {country} and describe each briefly.", "Compare {country} "
    "and {other} in terms of culture, economy and geography.", "Explain the economy of {country} to a "
    "high-school student.", "Write a poem about the landscapes of {country}.",
]
CONCEPT = [
    'Explain the meaning of the word "{w}" and use it in three sentences.', "Write a short poem about {w}.",
    "Write an essay of about {n} words on {w}.", 'Explain "{w}" to a five-year-old.', 'Give an analogy that '
    'explains the word "{w}".', 'What is the difference between "{w}" and "{w2}"?', 'Write a short story in '
    'which "{w}" and "{w2}" both play a part.', "Write a dialogue between two friends who disagree about "
    "{w}.", 'Give synonyms and antonyms of "{w}", with an example sentence for each.', 'Write a riddle whose '
    'answer is "{w}", then explain it.', 'Write a product description for something called "{w}".',
]
NAMES = ["Ava", "Ben", "Chloe", "Daniel", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jamal", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wei", "Yusuf", "Zoe"]
ITEMS = ["apples", "pencils", "stickers", "books", "cookies", "marbles", "stamps", "cards", "eggs", "oranges"]
PROBLEMS = [
    "{a} has {x} {item}. {a} buys {y} packs of {z} {item} each and gives {w} {item} to {b}. How many {item} "
    "does {a} have now?",
    "A train travels at {x} km per hour for {y} hours, then at {z} km per hour for {w} hours. How far does it "
    "travel in total, and what is its average speed?",
    "{a} earns ${x} an hour and works {y} hours a week. After {z} weeks {a} spends ${w} on a bike. How much "
    "money is left?",
    "A shop sells {item} at ${y} each. On Monday it sells {x}, on Tuesday twice as many, and on Wednesday {w} "
    "fewer than on Tuesday. How much money does it take in over the three days?",
    "A rectangle is {x} cm long and {y} cm wide. What are its area and perimeter? If each side grows by {z} "
    "cm, how much does the area grow?",
    "{a} reads {z} pages a day. The book has {x} pages. After {y} days, how many pages are left, and how many "
    "more days does {a} need to finish?",
    "In a class of {x} students, {p}% play football and half of the others play chess. How many students play "
    "neither?",
    "Solve for x: {y}x + {z} = {x}. Explain each step.",
    "What is {x} * {y} + {z} * {w}? Show your work step by step.",
    "{a} and {b} share {x} {item} in the ratio {y}:{z}. How many {item} does each get?",
    "A recipe needs {y} eggs for {z} cakes. How many eggs are needed for {x} cakes?",
    "{a} saves ${z} every week. How many weeks does {a} need to save ${x}, and how much will be left over?",
]
PUZZLES = [
    ("taller than", "Who is the tallest, and who is the shortest?"),
    ("older than", "Who is the oldest? Put everyone in order of age."),
    ("faster than", "Who finished the race first, and who finished last?"),
]


def conversations(seed: int = 0, narrative: list[Passage] | None = None,
                  cities: list[tuple[str, str]] | None = None, vocabulary: list[str] | None = None,
                  concepts: int = 1500, problems: int = 1000) -> list[list[dict]]:
    """The pool, in its order for `seed`: a narrative task for every passage, a prompt for every city and two
    for every country, `concepts` concept prompts and `problems` word problems. narrative, cities,
    vocabulary: None reads the installed sources (`corpus.kjv_passages`, `places`, `words`).
    Deterministic for a seed and the sources."""
    rng = random.Random(seed)
    narrative = kjv_passages() if narrative is None else narrative
    cities = places() if cities is None else cities
    vocabulary = words() if vocabulary is None else vocabulary
    if concepts > len(vocabulary):
        raise ValueError(f"conversations: concepts must be at most {len(vocabulary)} (the words), got {concepts}")
    out = [_narrative_task(rng, p, narrative, i) for i, p in enumerate(narrative)]
    out += [[_user(rng.choice(CITY).format(city=c, country=k))] for c, k in cities]
    countries = sorted({k for _, k in cities})
    for k in countries:
        for t in rng.sample(COUNTRY, 2):
            out.append([_user(t.format(country=k, other=rng.choice([o for o in countries if o != k] or [k])))])
    for w in rng.sample(vocabulary, concepts):
        out.append([_user(rng.choice(CONCEPT).format(w=w, w2=rng.choice(vocabulary), n=rng.choice((150, 300))))])
    out += [[_user(_problem(rng))] for _ in range(problems)]
    rng.shuffle(out)
    return out


def _narrative_task(rng: random.Random, p: Passage, narrative: list[Passage], i: int) -> list[dict]:
    family = rng.choices(list(NARRATIVE), weights=[w for w, _ in NARRATIVE.values()])[0]
    task = rng.choice(NARRATIVE[family][1]).format(title=p.title, lang=rng.choice(LANGS))
    text = p.text
    if family == "follow-up":
        return [_user(task), {"role": "assistant", "content": text}, _user(rng.choice(FOLLOW_UP))]
    if family == "compare":
        j = neighbour(narrative, i)
        if j is None:  # a one-passage book: summarise it instead
            task = rng.choice(NARRATIVE["summarise"][1])
        else:
            text = f"Passage 1:\n{text}\n\nPassage 2:\n{narrative[j].text}"
    paras = text.split("\n\n")
    if family == "continue":
        text = "\n\n".join(paras[: max(1, len(paras) // 2)])
    return [_user(rng.choice(LAYOUTS).format(task=task, text=text))]


def _problem(rng: random.Random) -> str:
    if rng.random() < 0.15:  # an ordering puzzle: a chain of comparisons, stated in a shuffled order
        relation, ask = rng.choice(PUZZLES)
        people = rng.sample(NAMES, rng.randint(3, 5))
        facts = [f"{a} is {relation} {b}." for a, b in zip(people, people[1:])]
        rng.shuffle(facts)
        return " ".join(facts) + " " + ask
    a, b = rng.sample(NAMES, 2)
    x, y, z, w = rng.randint(20, 400), rng.randint(2, 12), rng.randint(2, 30), rng.randint(1, 15)
    return rng.choice(PROBLEMS).format(a=a, b=b, x=x, y=y, z=z, w=w, p=rng.choice((10, 20, 25, 40, 50, 60)),
                                       item=rng.choice(ITEMS))
