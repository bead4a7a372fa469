"""Prompts the project writes itself, and how a prompt becomes token ids.

`builtin_prompts` crosses task templates with topics (writing, explanation, advice, reasoning, math,
code, extraction, summarisation, translation, role play); none comes from an evaluation set. Tree auto
calibrates on them and training answers them. `encode_prompt` wraps a prompt in the model's chat template;
`load_prompts` reads prompt files (JSONL), naming the line of a bad row.
"""
from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path

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
WORD_PROBLEMS = [
    "{name} buys {b} notebooks at {c} dollars each and pays with a 100-dollar bill. How much change does {name} get?",
    "A book has 500 pages. {name} reads {c}0 pages a day. After {b} days, how many pages are left?",
    "A farm has {a} cows. Each cow gives {b} litres of milk a day. How much milk does the farm get in {c} days?",
    "{name} saves {b}0 dollars a week. How many weeks does it take to save {a}0 dollars? Think step by step.",
    "A class of {a} students goes on a trip. Each bus holds {c} students and costs {b}00 dollars. What do the buses cost?",
    "{name} bakes {a} cookies, eats {b} and shares the rest equally among {c} friends. How many does each friend get?",
    "A shirt costs {a} dollars and is on sale for {b}0 percent off. {name} buys {c} shirts. How much does {name} pay?",
    "{name} runs {c} km on Monday and {b} km more each following day. How far does {name} run in {b} days in total?",
]
NAMES = ["Maria", "James", "Aisha", "Tom", "Lena", "Carlos", "Mei", "Omar"]
QUESTIONS = (
    [f"What is the capital of {c}?" for c in (
        "France", "Japan", "Brazil", "Canada", "Australia", "Egypt", "Kenya", "Norway", "Peru", "Vietnam",
        "Turkey", "Argentina", "Poland", "Thailand", "Morocco", "Chile", "Greece", "Sweden")]
    + [f"Who wrote {b}?" for b in (
        "Pride and Prejudice", "War and Peace", "Hamlet", "Don Quixote", "The Old Man and the Sea", "1984",
        "The Odyssey", "Frankenstein", "Moby-Dick", "The Little Prince", "One Hundred Years of Solitude")]
    + [f"Where is {x} located?" for x in (
        "the Eiffel Tower", "Machu Picchu", "the Taj Mahal", "the Great Barrier Reef", "Mount Kilimanjaro",
        "the Colosseum", "Angkor Wat", "the Sahara desert", "Lake Baikal", "Stonehenge", "Petra")]
    + [f"Who invented {x}?" for x in (
        "the telephone", "the light bulb", "the World Wide Web", "the steam engine", "dynamite", "the radio",
        "the printing press", "penicillin", "the airplane")]
    + [f"When did {x}?" for x in (
        "the First World War end", "humans first land on the Moon", "the Berlin Wall fall", "the Titanic sink",
        "the Roman Empire fall", "the French Revolution begin", "the first modern Olympic Games take place")]
    + [f"Why {x}?" for x in (
        "is the sky blue", "do leaves change colour in autumn", "do we have seasons", "does ice float on water",
        "do cats purr", "is the ocean salty", "do we dream", "does the Moon have phases", "do birds migrate")]
    + [f"How many {x}?" for x in (
        "legs does a spider have", "planets are in the solar system", "bones are in the human body",
        "players are on a football team", "strings does a violin have", "days does a leap year have",
        "continents are there", "keys does a piano have", "hearts does an octopus have")]
    + [f"Is it true that {x}?" for x in (
        "goldfish have a three-second memory", "the Great Wall of China is visible from space",
        "lightning never strikes the same place twice", "bats are blind", "we only use ten percent of our brain")]
)
TRANSLATE = {
    "German": [
        "Der Bahnhof wird im nächsten Jahr für zwei Monate geschlossen.",
        "Meine Schwester arbeitet seit drei Jahren als Ärztin in einem kleinen Krankenhaus.",
        "Die Regierung will bis 2030 die Hälfte des Stroms aus Wind und Sonne gewinnen.",
        "Am Wochenende soll es in ganz Bayern regnen und deutlich kühler werden.",
        "Die Mannschaft gewann das Spiel nach einem späten Tor in der Nachspielzeit.",
        "Viele Eltern suchen noch immer einen Platz im Kindergarten für ihre Kinder.",
        "Der Bürgermeister kündigte an, die Brücke über den Fluss neu zu bauen.",
        "In der Bibliothek gibt es jetzt auch Bücher in zwölf verschiedenen Sprachen.",
        "Die Preise für Lebensmittel sind im letzten Monat erneut gestiegen.",
        "Nach dem Unfall wurde die Autobahn für mehrere Stunden gesperrt.",
        "Das Museum zeigt eine Ausstellung über die Geschichte der Stadt.",
        "Die Forscher haben eine neue Art von Frosch im Regenwald entdeckt.",
        "Ich habe vergessen, meinem Freund zum Geburtstag zu gratulieren.",
        "Das Unternehmen will im Herbst fünfhundert neue Mitarbeiter einstellen.",
        "Die Schüler müssen ihre Hausaufgaben bis Freitag abgeben.",
        "Der Zug nach Hamburg hat heute leider vierzig Minuten Verspätung.",
        "Auf dem Markt kann man frisches Obst und Gemüse aus der Region kaufen.",
        "Die Polizei bittet die Bevölkerung um Hinweise zu dem Einbruch.",
        "Der Film erzählt die Geschichte einer Familie, die nach Amerika auswandert.",
        "Wegen des Streiks fallen morgen viele Flüge aus.",
        "Die Ärzte empfehlen, jeden Tag mindestens eine halbe Stunde spazieren zu gehen.",
        "Im Sommer kommen viele Touristen an die Seen in den Bergen.",
        "Die neue Software soll die Arbeit in den Büros deutlich erleichtern.",
        "Der Sänger sagte sein Konzert wegen einer Erkältung ab.",
        "Nach langen Verhandlungen einigten sich die Parteien auf einen Kompromiss.",
        "Unsere Nachbarn haben einen Hund, der jeden Morgen laut bellt.",
        "Die Stadt plant mehr Radwege und weniger Parkplätze im Zentrum.",
        "Das Gericht wird sein Urteil erst in der nächsten Woche verkünden.",
        "Kinder lernen eine Fremdsprache oft schneller als Erwachsene.",
        "Der Winter war so mild, dass die Skigebiete kaum Schnee hatten.",
    ],
    "French": [
        "Le musée sera fermé le lundi pendant tout le mois d'août.",
        "Ma grand-mère prépare toujours une tarte aux pommes le dimanche.",
        "Le gouvernement a annoncé de nouvelles mesures pour aider les agriculteurs.",
        "Il pleuvra demain matin, mais le soleil reviendra dans l'après-midi.",
        "Les étudiants manifestent contre la hausse des frais d'inscription.",
        "Nous avons raté le dernier train et avons dû dormir à l'hôtel.",
        "La ville a planté mille arbres le long de la rivière.",
        "Le joueur s'est blessé au genou pendant l'entraînement.",
        "Cette entreprise fabrique des vélos électriques depuis dix ans.",
        "Je voudrais réserver une table pour quatre personnes ce soir.",
        "Les scientifiques étudient les effets du bruit sur les oiseaux.",
        "Le festival de musique attire chaque été des milliers de visiteurs.",
    ],
    "Spanish": [
        "El mercado abre todos los días a las ocho de la mañana.",
        "Mi hermano estudia medicina en una universidad de Madrid.",
        "El gobierno quiere construir nuevas viviendas para los jóvenes.",
        "Mañana hará mucho calor en el sur del país.",
        "El equipo perdió la final después de una serie de penaltis.",
        "Los vecinos se quejan del ruido de la obra en la calle.",
        "La biblioteca ofrece cursos gratuitos de informática para mayores.",
        "Hemos visitado tres museos y una catedral en un solo día.",
        "La empresa presentó un teléfono más barato y con mejor batería.",
        "Los médicos recomiendan beber agua con frecuencia en verano.",
        "El concierto se canceló por culpa de la tormenta.",
        "Cada año llegan más turistas a las islas del norte.",
    ],
}
ENGLISH = [
    "The meeting has been moved to Thursday afternoon.", "Could you tell me the way to the train station?",
    "The new bridge will open to traffic next spring.", "She has been learning to play the guitar for a year.",
    "Prices in the shops have risen sharply this winter.", "The children planted tomatoes in the school garden.",
    "Our flight was delayed because of the fog.", "The company plans to hire two hundred new workers.",
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


def builtin_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct prompts drawn (with `seed`) from the templates: up to 15% each of short questions,
    translations and math word problems, 10% code, 5% short passages, the rest general tasks."""
    rng = random.Random(seed)
    general = [t.format(topic=a, other=b) for t in TASKS for a, b in zip(TOPICS, TOPICS[7:] + TOPICS[:7])]
    nums = list(itertools.product((3, 12, 45, 120), (4, 7, 30), (5, 9, 16)))
    math = ([t.format(a=a, b=b, c=c) for t in MATH for a, b, c in nums]
            + [t.format(name=m, a=a, b=b, c=c) for t in WORD_PROBLEMS for m in NAMES
               for a, b, c in itertools.product((24, 36, 60), (2, 3, 5), (4, 6, 8))])
    code = [t.format(job=j) for t in CODE for j in JOBS]
    passage = [t.format(passage=p) for t in PASSAGE_TASKS for p in PASSAGES]
    translate = [f"Translate {lang} to English: {s}" for lang, sents in TRANSLATE.items() for s in sents]
    translate += [f"Translate {lang} to English: {s} {s2}" for lang, sents in TRANSLATE.items()
                  for s, s2 in zip(sents, sents[1:] + sents[:1])]
    translate += [f"Translate English to {lang}: {s}" for lang in TRANSLATE for s in ENGLISH]
    pools = {"qa": (QUESTIONS, 0.15), "translate": (translate, 0.15), "math": (math, 0.15), "code": (code, 0.1),
             "passage": (passage, 0.05)}
    prompts = []
    for pool, share in pools.values():
        pool = list(dict.fromkeys(pool))
        rng.shuffle(pool)
        prompts += pool[: min(len(pool), round(share * n))]
    general = list(dict.fromkeys(general))
    rng.shuffle(general)
    if n - len(prompts) > len(general):
        raise ValueError(f"builtin_prompts: n must be at most {len(general) + len(prompts)}, got {n}")
    prompts += general[: n - len(prompts)]
    rng.shuffle(prompts)
    return prompts


def encode_prompt(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    """The prompt's token ids: wrapped in the model's chat template as one user turn (chat=True), or as is."""
    if tokenizer is None:
        raise ValueError("the model has no tokenizer: give an HF directory with tokenizer files, or a .gguf file")
    if chat and tokenizer.chat_template:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  return_dict=False))
    if chat:
        raise ValueError("the model's tokenizer has no chat template: pass --no-chat to use the prompt as is")
    return tokenizer(prompt).input_ids


def jsonl_rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSONL file (UTF-8, a byte-order mark allowed); a
    line that is not a JSON object raises a ValueError naming path:line."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not a JSON line ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: a row must be a JSON object, got {type(row).__name__}")
        yield i, row


def load_prompts(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, category) of each row {"prompt": str} or {"turns": [str, ...]} (the first turn) of a JSONL
    file, with an optional "category" string ("all" without one). A bad row or a file without rows raises
    a ValueError naming path:line or the path."""
    out = []
    for i, row in jsonl_rows(path):
        turns = row.get("turns")
        text = row.get("prompt") if "prompt" in row else turns[0] if isinstance(turns, list) and turns else None
        category = row.get("category", "all")
        if not isinstance(text, str) or not isinstance(category, str):
            raise ValueError(f"{path}:{i}: a prompt row needs a 'prompt' string or 'turns' of strings (and a "
                             f"'category' string if any), got {json.dumps(row)[:80]}")
        out.append((text, category))
    if not out:
        raise ValueError(f"{path}: no prompt rows")
    return out
