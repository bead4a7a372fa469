"""The offline text sources for reading tasks: markup becomes prose, passages stay within their word
budget, duplicates go, and a missing source names the package that installs it; the Bible's chapters,
the time-zone database's places, the word list and the German fortunes are read whole."""
import pytest

import re

from ht_kernels.train.corpus import (KJV_BOOKS, functions, german_texts, html_paragraphs, kjv_passages, passages,
                                     places, rst_paragraphs, words)

RST = """\
.. _tut-x:

*******
Classes
*******

Classes bundle data and functionality together, as :class:`object` and :func:`repr <builtins.repr>` show.
Creating a ``class`` creates a new *type* of object for the program to use.

.. note::

   This note is a directive and is dropped entirely from the text.

An example follows, and the block after it is code::

   class A:
       pass

The last paragraph of the document is prose again, with enough words to count.
"""

HTML = """<html><head><title>The  Title</title><style>p {x}</style></head><body>
<p>A paragraph of prose with quite a few words in it, &amp; an entity.</p>
<pre>SELECT 1; -- code, dropped from the prose entirely</pre>
<ul><li>A list item that also has more than eight words in it.</li></ul>
<p>short one</p></body></html>"""


def test_rst_keeps_prose_and_drops_markup():
    title, paras = rst_paragraphs(RST)
    assert title == "Classes"
    assert paras[0] == ("Classes bundle data and functionality together, as object and repr show. "
                        "Creating a class creates a new type of object for the program to use.")
    assert paras[1] == "An example follows, and the block after it is code:"
    assert paras[2].startswith("The last paragraph")
    assert len(paras) == 3 and not any("directive" in p or "pass" in p for p in paras)


def test_html_keeps_paragraphs_and_list_items_not_code():
    title, paras = html_paragraphs(HTML)
    assert title == "The Title"
    assert paras == ["A paragraph of prose with quite a few words in it, & an entity.",
                     "A list item that also has more than eight words in it."]


def test_passages_respect_the_word_budget_and_drop_duplicates(tmp_path):
    para = "<p>" + " ".join(f"w{i}" for i in range(50)) + "</p>"
    (tmp_path / "a.html").write_text(f"<title>A</title>{para * 5}")
    (tmp_path / "b.html").write_text(f"<title>B</title>{para * 5}")        # the same text: its passages go
    (tmp_path / "c.html").write_text("<title>C</title><p>" + " ".join(f"x{i}" for i in range(300)) + "</p>")
    ps = passages("sqlite-doc", min_words=100, max_words=160, root=tmp_path)
    assert [(p.doc, len(p.text.split())) for p in ps] == [("a.html", 150), ("a.html", 100), ("c.html", 160)]
    assert ps[0].title == "A" and ps[0].source == "sqlite-doc"


def test_bad_source_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="name must be one of"):
        passages("gutenberg")
    with pytest.raises(ValueError, match="min_words <= max_words"):
        passages("sqlite-doc", min_words=200, max_words=100)
    with pytest.raises(ValueError, match="apt-get install sqlite3-doc"):
        passages("sqlite-doc", root=tmp_path)


def test_functions_are_whole_defs_within_their_line_budget(tmp_path):
    body = "\n".join(f"    y{i} = x + {i}" for i in range(6))
    (tmp_path / "mod.py").write_text(
        f"import os\n\n@staticmethod\ndef six(x):\n{body}\n    return y5\n\n\ndef tiny(x):\n    return x\n\n\n"
        f"class C:\n    def meth(self, x):\n{body.replace('    ', '        ')}\n        return x\n")
    (tmp_path / "copy.py").write_text(f"def six(x):\n{body}\n    return y5\n")       # differs: no decorator
    (tmp_path / "dup.py").write_text((tmp_path / "copy.py").read_text())           # an exact duplicate: dropped
    (tmp_path / "broken.py").write_text("def (:\n")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_mod.py").write_text(f"def six(x):\n{body}\n    return y5\n")
    fs = functions(min_lines=6, max_lines=8, root=tmp_path)
    assert [(f.doc, f.title) for f in fs] == [("copy.py", "six"), ("mod.py", "six"), ("mod.py", "C.meth")]
    assert fs[1].text.startswith("@staticmethod\ndef six(x):\n    y0 = x + 0") and fs[1].text.endswith("return y5")
    assert fs[2].text.startswith("def meth(self, x):\n    y0") and fs[2].source == "python-stdlib"
    assert functions(min_lines=6, max_lines=8, root=tmp_path) == fs
    with pytest.raises(ValueError, match="apt-get install libpython3.11-stdlib"):
        functions(root=tmp_path / "test" / "none")
    with pytest.raises(ValueError, match="min_lines <= max_lines"):
        functions(min_lines=9, max_lines=3)


def fake_bible(ref: str) -> str:
    """The `bible` program's text of a chapter: Genesis has 3 chapters, every other book 1; a chapter past
    the last names the last one, as the program does."""
    book, chapter = re.fullmatch(r"(\d?[A-Za-z]+)(\d+):1-999", ref).groups()
    n = min(int(chapter), 3 if book == "Genesis" else 1)
    verses = "\n".join(f"  {v} {book} {n}:{v} and it was so " + "word " * 6 for v in range(1, 31))
    return f"\n{book} {n}\n\n{verses}\n"


def test_kjv_passages_are_whole_verses_of_every_chapter():
    ps = kjv_passages(min_words=100, max_words=200, read=fake_bible)
    assert {p.doc for p in ps} == set(KJV_BOOKS)
    assert sorted({p.title for p in ps if p.doc == "Genesis"}) == ["Genesis 1", "Genesis 2", "Genesis 3"]
    for p in ps:
        verses = p.text.split("\n\n")
        assert 100 <= len(p.text.split()) <= 200 and all(v.startswith(p.title.replace(" ", " ")) for v in verses)
    got = [v.split()[1] for p in ps if p.doc == "Genesis" for v in p.text.split("\n\n")]
    assert got == [f"{c}:{v}" for c in (1, 2, 3) for v in range(1, 31)][:len(got)] and len(got) >= 60
    with pytest.raises(ValueError, match="min_words <= max_words"):
        kjv_passages(min_words=20, max_words=10, read=fake_bible)


def test_places_and_words_read_their_lists(tmp_path):
    (tmp_path / "iso3166.tab").write_text("# codes\nNO\tNorway\nPE\tPeru\n")
    (tmp_path / "zone.tab").write_text("# zones\nNO\t+5955+01045\tEurope/Oslo\nPE\t-1203-07703\tAmerica/Lima\n"
                                       "PE\t-1330-07159\tAmerica/Cusco_Town\tsouth\n")
    assert places(tmp_path) == [("Oslo", "Norway"), ("Lima", "Peru"), ("Cusco Town", "Peru")]
    with pytest.raises(ValueError, match="apt-get install tzdata"):
        places(tmp_path / "none")
    (tmp_path / "words").write_text("apple\nApple\napple's\nzoo\nbanana\ncafé\nextraordinarily\n")
    assert words(path=tmp_path / "words") == ["apple", "banana"]
    with pytest.raises(ValueError, match="apt-get install wamerican"):
        words(path=tmp_path / "none")


def test_german_texts_are_the_fortune_records_without_art_or_duplicates(tmp_path):
    (tmp_path / "zitate.u8").write_text("Wer nicht fragt,\n   bleibt dumm. -- Sprichwort\n%\nZu kurz.\n%\n"
                                        "Wer nicht fragt, bleibt DUMM. -- Sprichwort\n%\n"
                                        "Ein Satz mit genau sieben Wörtern hier.\n")
    (tmp_path / "bilder.u8").write_text("Das ist ein Bild: ((( ))) ||| ### ___ === +++\n%\n"
                                        "Der Apfel fällt nicht weit vom Stamm.\n")
    (tmp_path / "asciiart.u8").write_text("Hier steht eigentlich nur eine Zeichnung aus Text.\n")
    assert german_texts(root=tmp_path) == ["Der Apfel fällt nicht weit vom Stamm.",
                                           "Wer nicht fragt, bleibt dumm. -- Sprichwort",
                                           "Ein Satz mit genau sieben Wörtern hier."]
    assert german_texts(min_words=1, max_words=2, root=tmp_path) == ["Zu kurz."]
    with pytest.raises(ValueError, match="apt-get install fortunes-de"):
        german_texts(root=tmp_path / "none")
