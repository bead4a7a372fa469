"""The CLI (`python -m ht_kernels generate`) and benchmarks/bench_decode.py end to end on a tiny random model.

The model (conftest's `tiny`) is an HF directory saved in a temporary folder: a random LlamaForCausalLM and a
byte-level tokenizer (256 byte tokens, no merges, two chat specials) built offline, so every string round-trips
and a multi-byte character spans several tokens.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

import ht_kernels as ht
from ht_kernels.cli import TextStream, main, parse_args
from ht_kernels.cpu import best_dtype
from conftest import byte_tokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
SUMMARY = re.compile(r"^(\d+) tokens in \d+\.\d s: \d+\.\d tokens/s, mean accepted length (\d+\.\d\d)$")


class Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.chunks = []

    def write(self, s: str) -> int:
        self.chunks.append(s)
        return super().write(s)


def test_stream_holds_back_incomplete_characters():
    tok = byte_tokenizer()
    text = "né ✓ 語"
    out = Recorder()
    stream = TextStream(tok, out=out)
    for t in tok(text).input_ids:  # one byte per token
        stream([[t]])
    stream.close()
    assert out.getvalue() == text + "\n"
    assert not any("\ufffd" in c for c in out.chunks)


@pytest.mark.parametrize("extra", [[], ["--ar"], ["--no-chat", "--temperature", "0.8", "--top-k", "20", "--seed", "1"]])
def test_generate_streams_text_and_reports(tiny, capsys, extra, tmp_path, monkeypatch):
    monkeypatch.setenv("HT_KERNELS_CACHE", str(tmp_path))
    argv = ["generate", "--prompt", "Grüße ✓", "--model", tiny, "--transfer", "none", "--max-new-tokens", "24", *extra]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert ("tree auto: choosing" in err) == ("--ar" not in extra)
    assert len(list(tmp_path.glob("trees/*.json"))) == ("--ar" not in extra)
    text, last = out.rstrip("\n").rsplit("\n", 1)
    m = SUMMARY.match(last)
    assert m, last
    n = int(m[1])
    assert 1 <= n <= 24 and float(m[2]) >= 1.0
    if not extra:  # greedy: the streamed text is the decoded greedy continuation
        dtype, exact, why = best_dtype("cpu")  # what --dtype auto chose, and said
        assert f"dtype auto: {why}" in err
        model = ht.load_model(tiny, dtype=dtype)
        ids = model.tokenizer.apply_chat_template([{"role": "user", "content": "Grüße ✓"}], add_generation_prompt=True,
                                                  return_dict=False)
        assert model.eos_token_ids == (model.tokenizer.eos_token_id,)  # generation stops there by default
        seq = ht.HiddenTransferDecoder(model, None, exact=exact).generate_ar([ids], max_new_tokens=24).sequences[0]
        assert len(seq) == n and text == model.tokenizer.decode(seq, skip_special_tokens=True)


def test_generate_errors_exit_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ht_kernels", "generate", "--prompt", "hi", "--model",
                           str(tmp_path / "missing")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: load_model") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("option,value", [
    ("--threads", "0"), ("--threads", "-1"), ("--threads", "two"), ("--threads", "100000"),
    ("--seed", str(2 ** 64)), ("--seed", "-1"), ("--max-new-tokens", "0"), ("--max-new-tokens", "1.5"),
    ("--temperature", "-1"), ("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "0"),
    ("--top-p", "1.5"), ("--top-k", "-1"), ("--budget", "0"), ("--lookup", "1"), ("--lookup", "-0.1"),
    ("--lookup", "nan"), ("--lookup-nodes", "-1")])
def test_bad_options_exit_2_before_the_model_loads(option, value, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["generate", "--prompt", "hi", option, value])
    assert e.value.code == 2 and f"argument {option}" in capsys.readouterr().err


@pytest.mark.parametrize("option,value,parsed", [
    ("--top-p", "1", 1.0), ("--top-p", "1e-9", 1e-9), ("--lookup", "0", 0.0), ("--temperature", "0", 0.0),
    ("--top-k", "0", 0), ("--budget", "1", 1), ("--lookup-nodes", "0", 0), ("--max-new-tokens", "1", 1)])
def test_option_bounds_are_accepted(option, value, parsed):
    args = parse_args(["generate", "--prompt", "hi", option, value])
    assert getattr(args, option[2:].replace("-", "_")) == parsed


def test_bench_decode_end_to_end(tiny, tmp_path, capsys, monkeypatch):
    import bench_decode

    monkeypatch.setenv("HT_KERNELS_CACHE", str(tmp_path / "cache"))

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["Say hi.", "ignored"]}\n{"prompt": "Count: 1 2 3"}\n{"prompt": "unused"}\n')
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    plot = ["--plot", str(png)] if HAS_MATPLOTLIB else []
    bench_decode.main(["--model", tiny, "--transfer", "none", "--prompts", str(prompts), "--limit", "2",
                       "--max-new-tokens", "12", "--json", str(js), *plot])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("device: ") and "threads: " in out[0] and "git: " in out[0]
    assert "2 prompts, 12 new tokens each" in out[1]
    result = json.loads(js.read_text())
    tree = result["tree"]
    assert tree["tree"] == "auto"
    assert [tree[k] for k in ("budget", "n_chains", "depth")] == [tree["auto"][k] for k in ("budget", "n_chains", "depth")]
    assert out[2] == f"dtype auto: {best_dtype('cpu')[2]}"
    assert out[3].startswith(f"ht tree: auto, {tree['budget']} nodes, pseudo chains of {tree['depth']} under ")
    assert out[4].startswith("tree auto (calibration): tau ")
    assert out[5].split() == ["method", "tokens/s", "tau", "new", "tokens", "seconds", "x", "AR", "x", "HF"]
    assert [line.split()[0] for line in out[6:9]] == ["ht", "ar", "hf"]
    assert out[9] == "identical to ar (ht): 1.00"
    assert set(result) == {"summary", "tree", "rows"}
    s = result["summary"]
    assert set(s) == {"ht", "ar", "hf", "speedup_vs_ar", "speedup_vs_hf", "identical_fraction"}
    for m in ("ht", "ar", "hf"):
        assert set(s[m]) == {"tokens_per_s", "tau", "new_tokens", "seconds", "peak_mib", "graphs"}
        assert s[m]["peak_mib"] is None and s[m]["graphs"] is None  # CUDA only
        assert s[m]["new_tokens"] == 24 and s[m]["tokens_per_s"] > 0 and s[m]["tau"] >= 1
    assert s["identical_fraction"] == 1.0 and s["speedup_vs_ar"] > 0 and s["speedup_vs_hf"] > 0
    assert len(result["rows"]) == 6
    for r in result["rows"]:
        assert {"prompt", "method", "new_tokens", "seconds", "accept_lengths"} <= set(r)
        assert sum(r["accept_lengths"]) == r["new_tokens"] == 12
    if HAS_MATPLOTLIB:  # an optional dependency (the `bench` extra)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_decode_sampling_subset(tiny, tmp_path, capsys):
    import bench_decode

    js = tmp_path / "r.json"
    bench_decode.main(["--model", tiny, "--transfer", "none", "--limit", "1", "--max-new-tokens", "6",
                       "--methods", "ht,hf", "--temperature", "0.7", "--tree", "default", "--json", str(js)])
    assert "identical to ar (ht): n/a (sampling)" in capsys.readouterr().out
    s = json.loads(js.read_text())["summary"]
    assert set(s) == {"ht", "hf", "speedup_vs_ar", "speedup_vs_hf", "identical_fraction"}
    assert s["speedup_vs_ar"] is None and s["identical_fraction"] is None and s["speedup_vs_hf"] > 0


def test_bench_decode_rounds(tiny, tmp_path, capsys):
    """--rounds repeats every (prompt, method) run with the methods' order rotated, and reports each
    round's speedup besides the totals."""
    import bench_decode

    js = tmp_path / "r.json"
    bench_decode.main(["--model", tiny, "--transfer", "none", "--limit", "2", "--max-new-tokens", "5",
                       "--methods", "ht,ar", "--tree", "default", "--rounds", "2", "--json", str(js)])
    out = capsys.readouterr().out
    result = json.loads(js.read_text())
    rows, s = result["rows"], result["summary"]
    assert [(r["round"], r["prompt"], r["method"]) for r in rows] == [
        (0, 0, "ht"), (0, 0, "ar"), (0, 1, "ht"), (0, 1, "ar"), (1, 0, "ar"), (1, 0, "ht"), (1, 1, "ar"), (1, 1, "ht")]
    assert s["ht"]["new_tokens"] == 20 and len(s["rounds"]) == 2
    per = [r["speedup_vs_ar"] for r in s["rounds"]]
    assert all(x > 0 for x in per) and s["rounds"][0]["speedup_vs_hf"] is None
    assert f"ht x AR per round: {per[0]:.2f} {per[1]:.2f} (median " in out and "x HF per round" not in out
    assert s["identical_fraction"] == 1.0
    with pytest.raises(SystemExit):
        bench_decode.main(["--model", tiny, "--rounds", "0"])


def test_train_cli_and_bench_drafts_end_to_end(tiny, tmp_path, capsys):
    """Train both drafters from the model's own answers to built-in prompts, then measure them; the
    replayed tau equals the decoded one (fp32)."""
    import bench_drafts

    from ht_kernels.train.__main__ import main as train_main

    common = ["--model", tiny, "--dtype", "float32", "--prompts", "4", "--gen-tokens", "8", "--steps", "2",
              "--batch-size", "2", "--K", "2"]
    assert train_main(["--out", str(tmp_path / "ht"), *common]) == 0
    assert train_main(["--out", str(tmp_path / "medusa"), "--method", "medusa", *common]) == 0
    data = [json.loads(line) for line in (tmp_path / "ht" / "data.jsonl").read_text().splitlines()]
    assert len(data) == 4 and all(len(r["tokens"]) > r["start"] + 1 for r in data)
    meta = ht.TransferWeights.load(tmp_path / "ht" / "transfer.safetensors").meta
    assert meta["trained"] == "yes" and meta["method"] == "transfer" and "--prompts 4" in meta["recipe"]
    assert meta["recipe"].startswith("python -m ht_kernels.train --out runs/ht ") and str(tmp_path) not in meta["recipe"]
    from test_train import with_refiner

    refined = tmp_path / "refined.safetensors"
    with_refiner(ht.TransferWeights.load(tmp_path / "ht" / "transfer.safetensors")).save(refined)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["Say hi."], "category": "chat"}\n{"prompt": "Count: 1 2 3", "category": "count"}\n')
    js, png = tmp_path / "d.json", tmp_path / "d.png"
    plot = ["--plot", str(png)] if HAS_MATPLOTLIB else []
    bench_drafts.main(["--model", tiny, "--dtype", "float32", "--prompts", str(prompts), "--max-new-tokens", "10",
                       "--drafter", f"ht={tmp_path / 'ht' / 'transfer.safetensors'}",
                       "--drafter", f"medusa={tmp_path / 'medusa' / 'medusa.safetensors'}",
                       "--drafter", f"refined={refined}", "--drafter", f"refined:norefine={refined}",
                       "--decode", "2", "--similarity", "1", "--json", str(js), *plot])
    out = capsys.readouterr().out
    rows = json.loads(js.read_text())["rows"]
    assert [r["name"] for r in rows] == ["ht", "medusa", "refined", "refined:norefine"]
    assert [r["kind"] for r in rows] == ["transfer", "medusa", "transfer", "transfer"]
    assert rows[3]["top1"] == rows[0]["top1"] and rows[3]["tau"] == rows[0]["tau"]  # without its refiner
    for r in rows:
        assert len(r["top1"]) == 2 and all(0 <= a <= b <= 1 for a, b in zip(r["top1"], r["top5"]))
        for tree, (decoded, replayed) in r["tau_decoded"].items():
            assert decoded == replayed == r["tau"][tree] >= 1
    assert len(rows[0]["similarity"]) == 2 and "similarity" not in rows[1]  # t = 1 of 2 layers: after 1 and 2
    assert "decoded tau" in out and "per category" in out
    for r in rows:
        cats = r["by_category"]
        assert list(cats) == ["chat", "count"] and all(c["prompts"] == 1 and c["tau dynamic64"] >= 1 for c in cats.values())
    if HAS_MATPLOTLIB:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # with the context lookup mixed in: a second row per drafter, replayed as the decoder decodes
    bench_drafts.main(["--model", tiny, "--dtype", "float32", "--prompts", str(prompts), "--max-new-tokens", "10",
                       "--drafter", f"ht={tmp_path / 'ht' / 'transfer.safetensors'}", "--lookup", "0.5",
                       "--lookup-nodes", "2", "--decode", "2", "--json", str(js)])
    looked = json.loads(js.read_text())["rows"]
    assert [(r["name"], r["lookup"], r["lookup_nodes"]) for r in looked] == [("ht", 0.0, 0), ("ht+lookup", 0.5, 2)]
    assert looked[0]["tau"] == rows[0]["tau"]
    for r in looked:
        for tree, (decoded, replayed) in r["tau_decoded"].items():
            assert decoded == replayed == r["tau"][tree] >= 1


def test_bench_projection_tiny_shape(tmp_path):
    """The projection runs end to end on CPU (tiny shape): projected speedup = tau x plain / step."""
    import bench_projection

    js = tmp_path / "p.json"
    bench_projection.main(["--shapes", "tiny", "--device", "cpu", "--dtype", "float32", "--context", "40",
                           "--trees", "default,dynamic16", "--reps", "2", "--json", str(js)])
    rows = json.loads(js.read_text())["rows"]
    assert [r["tree"] for r in rows] == ["plain", "default", "dynamic16"]
    plain = rows[0]["ms"]
    for r in rows[1:]:
        assert r["tokens"] == (16 + 2) * 4 and r["ms"] > 0  # with the lookup's 2 nodes
        assert r["projected_speedup"] == pytest.approx(r["tau"] * plain / r["ms"], rel=1e-6)


def test_bench_memory_end_to_end(tmp_path):
    """Peak memory per method, each in its own process, at a short context on CPU."""
    import bench_memory

    js = tmp_path / "m.json"
    bench_memory.main(["--context", "96", "--new-tokens", "6", "--trees", "default", "--threads", "1",
                       "--json", str(js)])
    rows = json.loads(js.read_text())["rows"]
    assert [r["method"] for r in rows] == ["ar", "ht default"]
    assert [r["step_tokens"] for r in rows] == [1, (16 + 2) * 4]  # 16 nodes and the lookup's 2, K = 3 pseudo each
    for r in rows:
        assert r["base_mib"] > 100 and r["peak_mib"] > 0 and r["tau"] >= 1  # the weights alone are 270 MB
        assert r["x_plain"] == pytest.approx(r["peak_mib"] / rows[0]["peak_mib"])
        total = (r["base_mib"] + r["peak_mib"]) / (rows[0]["base_mib"] + rows[0]["peak_mib"])
        assert r["total_x_plain"] == pytest.approx(total)


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib")
def test_plot_curve(tmp_path, capsys):
    import plot_curve

    for name, top1 in (("a", 0.3), ("b", 0.4)):
        (tmp_path / name).mkdir()
        rows = [{"step": s, "seconds": s, "tokens": 100 * s,
                 "held_out": {"ce": [2.0 - s / 10, 3.0], "top1": [top1 + s / 100, 0.1], "top5": [0.5, 0.2],
                              "drafts": [10, 9]}} for s in (0, 5)]
        (tmp_path / name / "curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_curve.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c.png")])
    out = capsys.readouterr().out
    assert "a: 5 steps, 500 tokens" in out and "0.350/0.100" in out and "0.450/0.100" in out
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="curve.jsonl does not exist"):
        plot_curve.main([str(tmp_path), "--out", str(tmp_path / "d.png")])
    (tmp_path / "c").mkdir()
    for text, match in (("", "no curve rows yet"), ('{"step": 0}\n', ":1: a curve row needs"),
                        ("[1]\n", ":1: a row must be")):
        (tmp_path / "c" / "curve.jsonl").write_text(text)
        with pytest.raises(ValueError, match=match):
            plot_curve.main([str(tmp_path / "c"), "--out", str(tmp_path / "d.png")])
    with pytest.raises(ValueError, match="--out .*: cannot write a file there"):
        plot_curve.main([str(tmp_path / "a"), "--out", str(tmp_path)])
