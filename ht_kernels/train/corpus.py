"""Long permissively licensed text that installs offline: passages for reading tasks (summarise, extract,
answer questions about, continue, translate), so that drafts learn to copy from a long context, and the
names and words that open-ended tasks are written about.

Each source is a Debian package read from its installed files; `SOURCES` names the package, the licence
and the reader. `passages` cuts a source's documents into passages of whole paragraphs (min_words..
max_words words), with the document's title, and drops exact duplicates (after whitespace and case
folding); `kjv_passages` does the same with the verses of each chapter of the King James Bible. `places`
and `words` read the time-zone database's countries and cities and an English word list; `german_texts`
the German sayings, quotations, anecdotes and jokes of fortunes-de. Nothing here comes from an evaluation
set.
"""
from __future__ import annotations

import ast
import hashlib
import re
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path


@dataclass(frozen=True)
class Source:
    """package: the Debian package that installs root; licence: of the text; kind: "rst" | "html"."""

    package: str
    licence: str
    root: str
    pattern: str
    kind: str


SOURCES = {
    "python-doc": Source("python3.11-doc", "PSF-2.0", "/usr/share/doc/python3.11/html/_sources", "**/*.rst.txt", "rst"),
    "postgresql-doc": Source("postgresql-doc-15", "PostgreSQL", "/usr/share/doc/postgresql-doc-15/html", "*.html",
                             "html"),
    "sqlite-doc": Source("sqlite3-doc", "public domain", "/usr/share/doc/sqlite3", "*.html", "html"),
}


CODE = Source("libpython3.11-stdlib", "PSF-2.0", "/usr/lib/python3.11", "**/*.py", "py")
KJV = Source("bible-kjv-text", "public domain (the 1611 translation; read with the `bible` program of bible-kjv)",
             "/usr/lib/bible.data", "", "kjv")
PLACES = Source("tzdata", "public domain", "/usr/share/zoneinfo", "zone.tab", "tab")
WORDS = Source("wamerican", "SCOWL (permissive: use, copy, modify, distribute with the notice)",
               "/usr/share/dict/american-english", "", "lines")
GERMAN = Source("fortunes-de", "GPL-2+", "/usr/share/games/fortunes/de", "*.u8", "fortune")
KJV_BOOKS = (
    "Genesis Exodus Leviticus Numbers Deuteronomy Joshua Judges Ruth 1Samuel 2Samuel 1Kings 2Kings 1Chronicles "
    "2Chronicles Ezra Nehemiah Esther Job Psalms Proverbs Ecclesiastes Song Isaiah Jeremiah Lamentations Ezekiel "
    "Daniel Hosea Joel Amos Obadiah Jonah Micah Nahum Habakkuk Zephaniah Haggai Zechariah Malachi Matthew Mark "
    "Luke John Acts Romans 1Corinthians 2Corinthians Galatians Ephesians Philippians Colossians 1Thessalonians "
    "2Thessalonians 1Timothy 2Timothy Titus Philemon Hebrews James 1Peter 2Peter 1John 2John 3John Jude "
    "Revelation").split()
_NOT_CODE = ("test", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo")


@dataclass(frozen=True)
class Passage:
    source: str
    doc: str       # path relative to the source's root
    title: str
    text: str


_ROLE = re.compile(r":[\w:+-]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")     # :func:`name <target>` -> name
_LITERAL = re.compile(r"``([^`]*)``")
_HEADING_RULE = re.compile(r"^([=\-~^*#\"'`+.]){3,}\s*$")


def rst_paragraphs(text: str) -> tuple[str, list[str]]:
    """reStructuredText -> (first heading, prose paragraphs): directives, comments, tables and literal
    blocks are dropped, inline roles and literals become plain words."""
    lines = text.splitlines()
    title, paras, cur, skip_indent = "", [], [], None
    for i, line in enumerate(lines):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:                      # inside a directive / literal block
            if not stripped or indent > skip_indent:
                continue
            skip_indent = None
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if _HEADING_RULE.match(stripped) or (stripped and _HEADING_RULE.match(nxt.strip()) and len(nxt.strip()) >= len(stripped)):
            if stripped and not _HEADING_RULE.match(stripped) and not title:
                title = stripped
            if cur:
                paras.append(" ".join(cur))
                cur = []
            continue
        if stripped.startswith(".. ") or stripped.startswith("|") or stripped.startswith("+--"):
            if cur:
                paras.append(" ".join(cur))
                cur = []
            skip_indent = indent
            continue
        if not stripped:
            if cur:
                paras.append(" ".join(cur))
                cur = []
            continue
        cur.append(stripped)
        if stripped.endswith("::"):                      # a literal block follows
            paras.append(" ".join(cur)[:-1])
            cur = []
            skip_indent = indent
    if cur:
        paras.append(" ".join(cur))
    clean = [_LITERAL.sub(r"\1", _ROLE.sub(r"\1", p)).replace("*", "") for p in paras]
    return title, [p for p in clean if len(p.split()) >= 8 and not p.startswith(("-", ">>>"))]


class _Text(HTMLParser):
    """The text of <p>, <li> and <dd> elements outside <pre>, <script> and <style>, and the <title>."""

    BLOCKS = {"p", "li", "dd"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.title, self.paras, self._cur, self._depth, self._skip, self._in_title = "", [], [], 0, 0, False

    def handle_starttag(self, tag, attrs):
        if tag in ("pre", "script", "style"):
            self._skip += 1
        elif tag in self.BLOCKS:
            self._flush()
            self._depth += 1
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag):
        if tag in ("pre", "script", "style"):
            self._skip = max(0, self._skip - 1)
        elif tag in self.BLOCKS:
            self._flush()
            self._depth = max(0, self._depth - 1)
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        elif self._depth and not self._skip:
            self._cur.append(data)

    def _flush(self):
        text = " ".join("".join(self._cur).split())
        if len(text.split()) >= 8:
            self.paras.append(text)
        self._cur = []


def html_paragraphs(text: str) -> tuple[str, list[str]]:
    """HTML -> (title, prose paragraphs of <p>, <li>, <dd>; code in <pre> is dropped)."""
    parser = _Text()
    parser.feed(text)
    parser.close()
    parser._flush()
    return " ".join(parser.title.split()), parser.paras


def passages(name: str, min_words: int = 120, max_words: int = 400, root: str | Path | None = None) -> list[Passage]:
    """The passages of source `name` (a key of SOURCES; root overrides its install path), in path order:
    consecutive paragraphs of one document joined until min_words, never past max_words (a longer
    paragraph is cut at max_words); exact duplicates dropped."""
    if name not in SOURCES:
        raise ValueError(f"passages: name must be one of {sorted(SOURCES)}, got {name!r}")
    if not 0 < min_words <= max_words:
        raise ValueError(f"passages: need 0 < min_words <= max_words, got {min_words} and {max_words}")
    src = SOURCES[name]
    base = Path(root or src.root)
    files = sorted(base.glob(src.pattern))
    if not files:
        raise ValueError(f"passages: no {src.pattern} under {base}; install it with `apt-get install {src.package}`")
    read = rst_paragraphs if src.kind == "rst" else html_paragraphs
    out, seen = [], set()
    for f in files:
        title, paras = read(f.read_text(errors="replace"))
        out += _join(name, str(f.relative_to(base)), title, paras, min_words, max_words, seen)
    return out


def _join(source: str, doc: str, title: str, paras: list[str], min_words: int, max_words: int,
          seen: set) -> list[Passage]:
    """Consecutive paragraphs joined into passages of min_words..max_words words (one longer paragraph
    cut at max_words); a passage whose folded text is in seen is dropped, the others are added to it."""
    out, cur = [], []
    for p in paras + [None]:
        words = sum(len(x.split()) for x in cur)
        if p is None or (cur and words + len(p.split()) > max_words):
            if words >= min_words:
                text = "\n\n".join(cur)
                key = hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()
                if key not in seen:
                    seen.add(key)
                    out.append(Passage(source, doc, title, text))
            cur = []
        if p is not None:
            cur.append(" ".join(p.split()[:max_words]))
    return out


def kjv_passages(min_words: int = 120, max_words: int = 400, read=None) -> list[Passage]:
    """The King James Bible (`KJV`) as passages of whole verses of one chapter, in canonical order: doc the
    book, title "Book N", each verse a paragraph (no verse numbers). read(ref) -> the `bible` program's
    text of one chapter ("Genesis 1"), which names the last chapter for a ref past it; None runs it."""
    if not 0 < min_words <= max_words:
        raise ValueError(f"kjv_passages: need 0 < min_words <= max_words, got {min_words} and {max_words}")
    read = read or _bible
    out, seen = [], set()
    for book in KJV_BOOKS:
        chapter, last = 1, None
        while True:
            text = read(f"{book}{chapter}:1-999")
            lines = text.strip().splitlines()
            heading = lines[0].strip() if lines else ""
            if not heading or heading == last:  # past the book's last chapter: the program repeats it
                break
            verses = [m.group(1) for m in map(_VERSE.match, lines[1:]) if m]
            out += _join("kjv", book, heading, verses, min_words, max_words, seen)
            chapter, last = chapter + 1, heading
    return out


_VERSE = re.compile(r"^\s*\d+\s+(.*\S)\s*$")


def _bible(ref: str) -> str:
    try:
        return subprocess.run(["bible", "-l100000", ref], capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise ValueError(f"kjv_passages: no `bible` program; install it with `apt-get install bible-kjv "
                         f"{KJV.package}`") from None


def places(root: str | Path | None = None) -> list[tuple[str, str]]:
    """(city, country) of every zone of the time-zone database (`PLACES`; root overrides its directory),
    in its order: the city from the zone's last part ("America/Sao_Paulo" -> "Sao Paulo"), the country's
    name from iso3166.tab."""
    base = Path(root or PLACES.root)
    try:
        countries = dict(_tab(base / "iso3166.tab"))
        zones = _tab(base / PLACES.pattern)
    except FileNotFoundError:
        raise ValueError(f"places: no {PLACES.pattern} under {base}; install it with `apt-get install "
                         f"{PLACES.package}`") from None
    return [(z[2].rsplit("/", 1)[-1].replace("_", " "), countries[z[0]]) for z in zones]


def _tab(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")]


def words(min_len: int = 5, max_len: int = 10, path: str | Path | None = None) -> list[str]:
    """The list's (`WORDS`) lower-case words of min_len..max_len letters, in its order."""
    try:
        lines = Path(path or WORDS.root).read_text(errors="replace").split()
    except FileNotFoundError:
        raise ValueError(f"words: no {path or WORDS.root}; install it with `apt-get install {WORDS.package}`") from None
    return [w for w in lines if w.isascii() and w.isalpha() and w.islower() and min_len <= len(w) <= max_len]


def german_texts(min_words: int = 6, max_words: int = 120, root: str | Path | None = None) -> list[str]:
    """Every record (the "%"-separated entries) of the German fortune files (`GERMAN`; root overrides its
    directory) of min_words..max_words words, in file order, its whitespace collapsed to single spaces;
    ascii art (its file, and records less than 60% letters) and exact duplicates (after case folding) left
    out."""
    files = sorted(Path(root or GERMAN.root).glob(GERMAN.pattern))
    if not files:
        raise ValueError(f"german_texts: no {GERMAN.pattern} under {root or GERMAN.root}; install them with "
                         f"`apt-get install {GERMAN.package}`")
    out, seen = [], set()
    for f in files:
        if f.name.startswith("asciiart"):
            continue
        for record in f.read_text(errors="replace").split("\n%\n"):
            text = " ".join(record.split())
            chars = text.replace(" ", "")
            if not min_words <= len(text.split()) <= max_words or sum(c.isalpha() for c in chars) < 0.6 * len(chars):
                continue
            if text.casefold() not in seen:
                seen.add(text.casefold())
                out.append(text)
    return out


def functions(min_lines: int = 6, max_lines: int = 40, root: str | Path | None = None) -> list[Passage]:
    """The top-level functions and methods of the standard library's modules (`CODE`; root overrides its
    path; tests and demos left out) of min_lines..max_lines lines, in path order, as passages: doc the
    module's path, title its qualified name, text its source with the docstring. Exact duplicates dropped."""
    if not 0 < min_lines <= max_lines:
        raise ValueError(f"functions: need 0 < min_lines <= max_lines, got {min_lines} and {max_lines}")
    base = Path(root or CODE.root)
    files = [f for f in sorted(base.glob(CODE.pattern))
             if not any(part.startswith(_NOT_CODE) for part in f.relative_to(base).parts)]
    if not files:
        raise ValueError(f"functions: no {CODE.pattern} under {base}; install it with `apt-get install {CODE.package}`")
    out, seen = [], set()
    for f in files:
        text = f.read_text(errors="replace")
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines()
        for node, owner in _defs(tree):
            code = "\n".join(lines[node.lineno - 1 - len(node.decorator_list):node.end_lineno])
            n = node.end_lineno - node.lineno + 1
            if min_lines <= n <= max_lines and code not in seen:
                seen.add(code)
                name = f"{owner}.{node.name}" if owner else node.name
                out.append(Passage("python-stdlib", str(f.relative_to(base)), name, _dedent(code)))
    return out


def _defs(tree: ast.Module):
    """(function node, class name or "") of a module's top-level functions and its classes' methods."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, ""
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield sub, node.name


def _dedent(code: str) -> str:
    lines = code.splitlines()
    pad = min(len(x) - len(x.lstrip()) for x in lines if x.strip())
    return "\n".join(x[pad:] for x in lines)
