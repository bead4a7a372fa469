"""Bad input to the benchmark scripts: a bad option is refused by argparse naming it (exit 2), a bad file or a
model that does not fit is one line `error: ...` (exit 2), and both come before the work: the prompts, the
drafters and the output paths are checked before the model loads (the model given here does not exist, so a
check that came later would report the model instead)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ht_kernels.decode.transfer import TransferWeights
from ht_kernels.drafts.prompts import load_prompts
from ht_kernels.model import ModelConfig
from ht_kernels.train.cli import check_out_file, run_main

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
NO_MODEL = "no-such-model.gguf"


def refused(main, argv, capsys, match: str) -> None:
    """main(argv) ends with exit status 2 and `match` in its one error line (argparse's or run_main's)."""
    try:
        status = run_main(main, argv)
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and match in err, (status, err[-400:])
    assert "Traceback" not in err


def test_prompt_files_are_read_and_bad_rows_are_refused_with_their_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_bytes('\ufeff{"prompt": "a"}\n\n{"turns": ["b", "c"], "category": "chat"}\n'.encode())
    assert load_prompts(f) == [("a", "all"), ("b", "chat")]
    for text, match in (('{"prompt": "a"}\n{"turns": [3]}\n', ":2: a prompt row needs"),
                        ('{"prompt": 5}\n', ":1: a prompt row needs"),
                        ('{"turns": []}\n', ":1: a prompt row needs"),
                        ('{"prompt": "a", "category": 1}\n', ":1: a prompt row needs"),
                        ('{"tokens": [1, 2]}\n', ":1: a prompt row needs"),
                        ('["a"]\n', ":1: a row must be a JSON object, got list"),
                        ('{"prompt": "a\n', ":1: not a JSON line"),
                        ("\n\n", ": no prompt rows")):
        f.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_prompts(f)
    f.write_bytes(b"\x00\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        load_prompts(f)


def test_check_out_file_leaves_no_file_behind_and_refuses_what_cannot_be_written(tmp_path):
    check_out_file("--json", str(tmp_path / "new.json"))
    assert not (tmp_path / "new.json").exists()
    (tmp_path / "old.json").write_text("kept")
    check_out_file("--json", str(tmp_path / "old.json"))
    assert (tmp_path / "old.json").read_text() == "kept"
    for path in (tmp_path, tmp_path / "missing" / "x.json", tmp_path / "old.json" / "x.json"):
        with pytest.raises(ValueError, match="--json .*: cannot write a file there"):
            check_out_file("--json", str(path))


def test_run_main_exit_status():
    assert run_main(lambda argv: {"rows": []}) == 0  # a result, not a status
    assert run_main(lambda argv: 3) == 3
    assert run_main(lambda argv: (_ for _ in ()).throw(ValueError("bad"))) == 2


@pytest.mark.parametrize("argv,match", [
    (["--limit", "-1"], "argument --limit: must be >= 0"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number"),
    (["--temperature", "-1"], "argument --temperature"),
    (["--top-p", "0"], "argument --top-p: must be in (0, 1]"),
    (["--top-p", "1.5"], "argument --top-p"),
    (["--top-k", "-1"], "argument --top-k"),
    (["--seed", "-1"], "argument --seed"),
    (["--budget", "0"], "argument --budget"),
    (["--n-chains", "0"], "argument --n-chains"),
    (["--threads", "0"], "argument --threads"),
    (["--lookup", "1"], "argument --lookup: must be in [0, 1)"),
    (["--lookup-nodes", "-2"], "argument --lookup-nodes"),
    (["--rounds", "0"], "argument --rounds"),
    (["--device", "tpu9"], "argument --device"),
    (["--methods", "ht,xx"], "--methods must be a comma-separated subset"),
    (["--prompts", ""], "argument --prompts: must be a non-empty path"),
])
def test_bench_decode_refuses_bad_options(argv, match, capsys):
    import bench_decode

    refused(bench_decode.main, ["--model", NO_MODEL, *argv], capsys, match)


def test_bench_decode_checks_prompts_and_outputs_before_the_model(tmp_path, capsys):
    import bench_decode

    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a"}\n{"turns": [3]}\n')
    refused(bench_decode.main, ["--model", NO_MODEL, "--prompts", str(bad)], capsys, "p.jsonl:2: a prompt row needs")
    refused(bench_decode.main, ["--model", NO_MODEL, "--prompts", str(tmp_path / "none.jsonl")], capsys,
            "No such file")
    for option in ("--json", "--plot"):
        refused(bench_decode.main, ["--model", NO_MODEL, option, str(tmp_path)], capsys,
                f"{option} {tmp_path}: cannot write a file there")
    refused(bench_decode.main, ["--model", NO_MODEL, "--limit", "1"], capsys, f"got '{NO_MODEL}'")


def test_bench_decode_reports_library_errors_in_one_line(tiny, tmp_path, capsys):
    import bench_decode

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    common = ["--model", tiny, "--prompts", str(prompts), "--tree", "default", "--methods", "ht", "--dtype", "float32"]
    refused(bench_decode.main, [*common, "--transfer", str(tmp_path / "none.safetensors")], capsys,
            "transfer must be 'default', a weights file")
    TransferWeights.untrained(32, 2, K=2, layer=1).save(tmp_path / "small.safetensors")
    refused(bench_decode.main, [*common, "--transfer", str(tmp_path / "small.safetensors")], capsys,
            "transfer weights must be [K, 64, 64]")


@pytest.mark.parametrize("argv,match", [
    (["--drafter", "ht"], "argument --drafter: must be NAME=PATH, got ht="),
    (["--drafter", "=x.safetensors"], "argument --drafter: must be NAME=PATH"),
    (["--drafter", "a=b", "--stride", "0"], "argument --stride"),
    (["--drafter", "a=b", "--trees", "default,dynamic0"], "argument --trees: must be default or dynamicN"),
    (["--drafter", "a=b", "--lookup", "2"], "--lookup must be weights in (0, 1)"),
    (["--drafter", "a=b", "--lookup-ngram", "0"], "argument --lookup-ngram"),
    (["--drafter", "a=b", "--decode", "-1"], "argument --decode"),
])
def test_bench_drafts_refuses_bad_options(argv, match, capsys):
    import bench_drafts

    refused(bench_drafts.main, ["--model", NO_MODEL, *argv], capsys, match)


def test_bench_drafts_checks_drafters_before_the_model(tmp_path, capsys):
    import bench_drafts

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    common = ["--model", NO_MODEL, "--prompts", str(prompts)]
    refused(bench_drafts.main, [*common, "--drafter", f"ht={tmp_path / 'none.safetensors'}"], capsys,
            "none.safetensors: no such file")
    (tmp_path / "junk.safetensors").write_bytes(b"junk" * 10)
    refused(bench_drafts.main, [*common, "--drafter", f"ht={tmp_path / 'junk.safetensors'}"], capsys,
            "junk.safetensors: not a readable safetensors file")
    TransferWeights.untrained(32, 2, K=2, layer=1).save(tmp_path / "maps.safetensors")
    refused(bench_drafts.main, [*common, "--drafter", f"ht={tmp_path / 'maps.safetensors'}", "--json", str(tmp_path)],
            capsys, "cannot write a file there")
    refused(bench_drafts.main, [*common, "--drafter", f"ht={tmp_path / 'maps.safetensors'}"], capsys,
            f"got '{NO_MODEL}'")


def test_bench_drafts_refuses_drafters_that_do_not_fit_the_model():
    import bench_drafts
    from ht_kernels.baselines.medusa import MedusaWeights

    model = SimpleNamespace(config=ModelConfig(vocab_size=50, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                               head_dim=16, hidden_dim=128))
    bench_drafts.check_weights(model, "ok", TransferWeights.untrained(64, 2, K=2, layer=1))
    with pytest.raises(ValueError, match=r"--drafter ht: transfer weights must be \[K, 64, 64\]"):
        bench_drafts.check_weights(model, "ht", TransferWeights.untrained(32, 2, K=2, layer=1))
    with pytest.raises(ValueError, match="--drafter deep: "):
        bench_drafts.check_weights(model, "deep", TransferWeights.untrained(64, 4, K=2, layer=3))
    heads = MedusaWeights(TransferWeights.untrained(48, 2, K=3).weight, TransferWeights.untrained(48, 2, K=3).bias)
    with pytest.raises(ValueError, match=r"--drafter m: Medusa heads must be \[K, 64, 64\]"):
        bench_drafts.check_weights(model, "m", heads)


@pytest.mark.parametrize("argv,match", [
    (["--shapes", "tiny,llama9"], "argument --shapes: must be a comma-separated subset"),
    (["--tau", "default=x"], "argument --tau: must be tree=tau pairs"),
    (["--tau", "default=0.5"], "argument --tau: tau must be finite and >= 1"),
    (["--trees", "dynamicx"], "argument --trees"),
    (["--reps", "0"], "argument --reps"),
    (["--context", "0"], "argument --context"),
    (["--graphs", "--device", "cpu"], "--graphs needs --device cuda"),
    (["--context", "4090"], "--context 4090: a tiny default step (72 tokens) after it needs 4162 positions"),
])
def test_bench_projection_refuses_bad_options(argv, match, capsys):
    import bench_projection

    refused(bench_projection.main, ["--shapes", "tiny", "--trees", "default", "--device", "cpu", "--dtype", "float32",
                                    "--reps", "1", *argv], capsys, match)


def test_bench_projection_refuses_a_tau_json_without_the_row(tmp_path, capsys):
    import bench_projection

    f = tmp_path / "drafts.json"
    for text in ('{"rows": [{"kind": "medusa", "tau": {}}]}', "not json", "[]"):
        f.write_text(text)
        refused(bench_projection.main, ["--shapes", "tiny", "--device", "cpu", "--tau-json", str(f)], capsys,
                "not a bench_drafts.py --json file with a transfer row")


@pytest.mark.parametrize("script,argv,match", [
    ("bench_memory", ["--context", "0"], "argument --context"),
    ("bench_memory", ["--new-tokens", "0"], "argument --new-tokens"),
    ("bench_memory", ["--trees", "default,dynamic9"], "--trees must be a comma-separated subset"),
    ("bench_generation", ["--rows", "0"], "argument --rows"),
    ("bench_generation", ["--budgets", "4096,0"], "argument --budgets"),
    ("bench_train_step", ["--reps", "0"], "argument --reps"),
    ("bench_train_step", ["--batch-size", "0"], "argument --batch-size"),
    ("bench_tree_attention", ["--case", "B8"], "argument --case: must be KEY=VALUE pairs"),
    ("bench_tree_attention", ["--case", "B=999"], "--case B=999: no case has these values"),
    ("bench_tree_attention", ["--providers", "triton,foo"], "--providers triton,foo: the providers are torch,"),
    ("bench_hidden_transfer", ["--device", "nope"], "argument --device"),
    ("bench_step_ops", ["--json", "/"], "--json /: cannot write a file there"),
    ("tune_tree_attention", ["--splits", "1,0"], "argument --splits: must be in [1, 64]"),
])
def test_other_benchmarks_refuse_bad_options(script, argv, match, capsys):
    module = __import__(script)
    refused(module.main, ["--model", NO_MODEL, *argv] if script.startswith(("bench_memory", "bench_gen", "bench_train"))
            else argv, capsys, match)


def test_bench_memory_reports_a_failed_child_in_one_line(tiny, capsys):
    import bench_memory

    refused(bench_memory.main, ["--model", tiny, "--context", "5000", "--new-tokens", "2", "--trees", "default",
                                "--dtype", "float32", "--threads", "1"], capsys,
            "error: ar: the longest prompt (5000 tokens) + max_new_tokens (2)")


def test_bench_train_step_checks_the_config_against_the_model(tiny, capsys):
    import bench_train_step

    refused(bench_train_step.main, ["--model", tiny, "--dtype", "float32", "--layer", "7"], capsys,
            "layer must be an int in [1, 1] for this 2-layer model")


def test_bench_json_is_written_where_asked(tmp_path, capsys):
    import bench_step_ops

    out = tmp_path / "deep" / "er" / "step_ops.json"
    assert run_main(bench_step_ops.main, ["--quick", "--providers", "torch", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["rows"]
