"""Self-distillation data: the task pools (passages and code; narrative, places, concepts, problems; German
text to translate), and
the sharded dataset that several runs build together (resumes, refuses another recipe, rebuilds prompts and drops those that changed)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from test_model import needs_smollm2

from ht_kernels.train import dataset, german_tasks, open_tasks, tasks
from ht_kernels.train.corpus import Passage

WORDS = "the cache keeps every page it reads until the pool is full and then drops the oldest one".split()


def docs(n: int = 30) -> list[Passage]:
    """Passages of a few documents, several paragraphs each."""
    return [Passage("python-doc", f"doc{i // 3}.rst", f"Topic {i // 3}",
                    "\n\n".join(" ".join(WORDS[(i + j) % 7:] + [f"p{i}x{j}"]) for j in range(4))) for i in range(n)]


def code(n: int = 6) -> list[Passage]:
    return [Passage("python-stdlib", f"mod{i}.py", f"f{i}", f"def f{i}(x):\n    return x + {i}\n") for i in range(n)]


def test_pool_is_every_passage_function_and_builtin_prompt_in_a_seeded_order():
    pool = tasks.conversations(0, docs(), code(), builtin=10)
    assert len(pool) == 30 + 6 + 10
    assert pool == tasks.conversations(0, docs(), code(), builtin=10)
    assert pool != tasks.conversations(1, docs(), code(), builtin=10)
    for conv in pool:
        assert conv[-1]["role"] == "user" and conv[-1]["content"].strip()
        assert [m["role"] for m in conv] in (["user"], ["user", "assistant", "user"])
    text = json.dumps(pool)
    assert all(f"return x + {i}" in text for i in range(6))
    # every passage is used: its first paragraph's marker (continue and translate keep a part of it)
    assert sum(f"p{i}x" in text for i in range(30)) == 30
    follow = [c for c in tasks.conversations(3, docs(200), [], builtin=0) if len(c) == 3]
    assert follow and all(c[1]["content"] in {p.text for p in docs(200)} for c in follow)


def test_every_family_and_layout_occurs_and_fills_its_fields():
    pool = tasks.conversations(0, docs(400), code(40), builtin=0)
    prompts = [c[-1]["content"] for c in pool]
    assert not any("{" + f + "}" in p for p in prompts for f in ("title", "text", "task", "n", "lang", "code"))
    for pool_of in (tasks.SUMMARISE, tasks.QUESTION, tasks.CODE, tasks.COMPARE, tasks.TRANSLATE):
        stems = [t.split("{")[0][:30] for t in pool_of]
        assert sum(any(s in p for p in prompts) for s in stems) >= len(stems) // 2


def narrative(n: int = 40) -> list[Passage]:
    """Passages of a few books, four chapters each, several verses each."""
    return [Passage("kjv", f"Book{i // 4}", f"Book{i // 4} {i % 4 + 1}",
                    "\n\n".join(" ".join(WORDS[(i + j) % 5:] + [f"v{i}x{j}"]) for j in range(4))) for i in range(n)]


CITIES = [("Oslo", "Norway"), ("Lima", "Peru"), ("Cusco", "Peru"), ("Sao Paulo", "Brazil")]
VOCAB = [f"word{i}" for i in range(50)]


def test_open_pool_is_every_passage_city_country_and_the_drawn_prompts_in_a_seeded_order():
    pool = open_tasks.conversations(0, narrative(), CITIES, VOCAB, concepts=10, problems=20)
    assert len(pool) == 40 + 4 + 2 * 3 + 10 + 20
    assert pool == open_tasks.conversations(0, narrative(), CITIES, VOCAB, concepts=10, problems=20)
    assert pool != open_tasks.conversations(1, narrative(), CITIES, VOCAB, concepts=10, problems=20)
    for conv in pool:
        assert conv[-1]["role"] == "user" and conv[-1]["content"].strip()
        assert [m["role"] for m in conv] in (["user"], ["user", "assistant", "user"])
        assert not any("{" + f + "}" in m["content"] for m in conv for f in
                       ("title", "text", "task", "lang", "city", "country", "other", "w", "w2", "n", "a", "x", "item"))
    text = json.dumps(pool)
    assert sum(f"v{i}x" in text for i in range(40)) == 40          # every passage (its first verse's marker)
    assert all(c in text for c, _ in CITIES)
    prompts = [c[-1]["content"] for c in pool]
    assert all(sum(k in p for p in prompts) >= 2 for k in ("Norway", "Peru", "Brazil"))
    assert len({p for p in prompts if "word" in p}) >= 10
    follow = [c for c in open_tasks.conversations(3, narrative(200), [], VOCAB, 0, 0) if len(c) == 3]
    assert follow and all(c[1]["content"] in {p.text for p in narrative(200)} for c in follow)
    with pytest.raises(ValueError, match="concepts must be at most 50"):
        open_tasks.conversations(0, narrative(), CITIES, VOCAB, concepts=51)


def test_every_open_family_occurs():
    pool = open_tasks.conversations(0, narrative(400), CITIES * 20, VOCAB, concepts=50, problems=300)
    prompts = [m["content"] for c in pool for m in c if m["role"] == "user"]
    for templates in [t for _, t in open_tasks.NARRATIVE.values()] + [open_tasks.CITY, open_tasks.COUNTRY,
                                                                        open_tasks.CONCEPT, open_tasks.PROBLEMS]:
        stems = [t.split("{")[0][:25] for t in templates if t.split("{")[0]]
        assert sum(any(s in p for p in prompts) for s in stems) >= len(stems) // 2
    assert any("taller than" in p or "older than" in p or "faster than" in p for p in prompts)


def test_german_pool_uses_every_text_once_in_a_seeded_order():
    texts = [f"Satz {i} ist kurz." for i in range(200)]
    pool = german_tasks.conversations(0, texts)
    assert pool == german_tasks.conversations(0, texts) and pool != german_tasks.conversations(1, texts)
    prompts = [c[0]["content"] for c in pool]
    assert all(len(c) == 1 and c[0]["role"] == "user" and "{text}" not in c[0]["content"] for c in pool)
    assert sorted(int(w) for p in prompts for w in p.split() if w.isdigit()) == list(range(200))
    assert {sum(f"Satz {i} " in p for i in range(200)) for p in prompts} == {1, 2, 3}
    stems = [t.split("{")[0] or t.split("}")[1] for _, ts in german_tasks.FAMILIES.values() for t in ts]
    assert all(any(s in p for p in prompts) for s in stems)
    assert german_tasks.conversations(0, []) == []


@pytest.fixture(scope="module")
def smol():
    from ht_kernels.loading import load_model

    return load_model("smollm2-135m")


@needs_smollm2
def test_dataset_builds_in_shards_resumes_and_loads(tmp_path, monkeypatch, smol):
    pool = tasks.conversations(0, docs(8), code(2), builtin=0)
    monkeypatch.setitem(dataset.POOLS, "docs", lambda seed: pool)
    import ht_kernels.loading

    monkeypatch.setattr(ht_kernels.loading, "load_model", lambda name, dtype, device: smol)
    out = tmp_path / "ds"
    argv = ["--out", str(out), "--dtype", "float32", "--gen-tokens", "3", "--shard-size", "4", "--gen-batch", "3"]
    m = dataset.build(dataset.parse_args(argv + ["--shards", "2"]))
    assert m["pool"] == 10 and m["n_shards"] == 3 and sorted(m["shards"]) == ["0", "1"]
    assert all(s["conversations"] == 4 and 0 < s["answer_tokens"] <= 12 for s in m["shards"].values())
    first = (out / "shard-00000.npz").stat().st_mtime_ns
    m = dataset.build(dataset.parse_args(argv))                                   # resumes: shard 2 only
    assert sorted(m["shards"]) == ["0", "1", "2"] and (out / "shard-00000.npz").stat().st_mtime_ns == first
    with pytest.raises(ValueError, match="recipe"):
        dataset.build(dataset.parse_args(argv[:-1] + ["4"]))
    examples = dataset.load(out, smol.tokenizer)
    assert len(examples) == 10
    for e, conv in zip(examples, pool):
        prompt = tasks.encode(smol.tokenizer, conv)
        assert e.tokens[:len(prompt)] == prompt and e.start == len(prompt) - 1 and 0 < len(e.tokens) - len(prompt) <= 3
    monkeypatch.setattr(dataset, "HELD_OUT_EVERY", 4)
    held, rest = dataset.load(out, smol.tokenizer, "held-out"), dataset.load(out, smol.tokenizer, "train")
    assert held == [examples[i] for i in (0, 4, 8)] and rest == [e for i, e in enumerate(examples) if i % 4]
    z = np.load(out / "shard-00001.npz")
    assert z["answers"].dtype == np.uint16 and z["offsets"][-1] == len(z["answers"])
    changed = [list(c) for c in pool]
    changed[5] = [{"role": "user", "content": "another prompt"}]
    monkeypatch.setitem(dataset.POOLS, "docs", lambda seed: changed)
    with pytest.warns(UserWarning, match="1 prompts"):
        assert len(dataset.load(out, smol.tokenizer)) == 9
    with pytest.raises(ValueError, match="manifest"):
        dataset.load(tmp_path, smol.tokenizer)
    # a machine without the sources builds the same dataset from the exported pool
    monkeypatch.setitem(dataset.POOLS, "docs", lambda seed: pool)
    dataset.build(dataset.parse_args(argv + ["--export-pool", str(tmp_path / "pool.npz")]))
    monkeypatch.setitem(dataset.POOLS, "docs", lambda seed: 1 / 0)
    m2 = dataset.build(dataset.parse_args(["--out", str(tmp_path / "ds2"), *argv[2:], "--pool", str(tmp_path / "pool.npz")]))
    assert [m2["shards"][k]["answer_tokens"] for k in "012"] == [m["shards"][k]["answer_tokens"] for k in "012"]
    for k in "012":
        a, b = np.load(out / f"shard-0000{k}.npz"), np.load(tmp_path / "ds2" / f"shard-0000{k}.npz")
        assert all(np.array_equal(a[f], b[f]) for f in ("index", "prompt_hash", "offsets", "answers"))
    assert dataset.load(tmp_path / "ds2", smol.tokenizer) == examples               # its prompts from the pool
    (tmp_path / "ds2" / "shard-00002.npz").unlink()      # a later run without --pool resumes from OUT/pool.npz
    dataset.build(dataset.parse_args(["--out", str(tmp_path / "ds2"), *argv[2:]]))
    a, b = np.load(out / "shard-00002.npz"), np.load(tmp_path / "ds2" / "shard-00002.npz")
    assert all(np.array_equal(a[f], b[f]) for f in ("index", "prompt_hash", "offsets", "answers"))
    with pytest.raises(ValueError, match="seed 0"):
        dataset.build(dataset.parse_args(["--out", str(tmp_path / "ds3"), *argv[2:], "--seed", "1",
                                          "--pool", str(tmp_path / "pool.npz")]))
    with pytest.raises(ValueError, match="tasks 'docs'"):  # a pool of the documentation tasks is not the open one
        dataset.build(dataset.parse_args(["--out", str(tmp_path / "ds4"), *argv[2:], "--tasks", "open",
                                          "--pool", str(tmp_path / "pool.npz")]))
    monkeypatch.setitem(dataset.POOLS, "docs", lambda seed: pool)
    manifest = json.loads((out / "manifest.json").read_text())  # a manifest of before --tasks: documentation tasks
    assert manifest["recipe"].pop("tasks") == "docs"
    (out / "manifest.json").write_text(json.dumps(manifest))
    dataset.build(dataset.parse_args(argv))
    with pytest.raises(ValueError, match="recipe"):
        dataset.build(dataset.parse_args(argv + ["--tasks", "open"]))
