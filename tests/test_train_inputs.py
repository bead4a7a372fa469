"""Bad input to the training API and its command lines (train, dataset, calibrate, refine): each is refused
with an error that names the option or the file (and line), before any work it would spoil; nothing
non-finite is ever written."""
import json
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import ht_kernels.loading
from ht_kernels.decode.transfer import TransferWeights
from ht_kernels.drafts.examples import Example
from ht_kernels.train import dataset
from ht_kernels.train.__main__ import export, main as train_main
from ht_kernels.train.calibrate import main as calibrate_main
from ht_kernels.train.data import load_jsonl
from ht_kernels.train.refine import main as refine_main
from ht_kernels.train.trainer import CHECKPOINT, TrainConfig, train
from test_decode import random_transfer, tiny_model

V = 32  # the tiny model's vocabulary; its context is 64 positions


@pytest.fixture
def model(monkeypatch):
    """The tiny model, which every command line here loads whatever its --model."""
    m = tiny_model(vocab=V, max_seq_len=64)
    monkeypatch.setattr(ht_kernels.loading, "load_model", lambda name, dtype, device: m)
    return m


def examples(n: int = 6, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    return [Example(torch.randint(0, V, (int(L),), generator=g).tolist(), i % 3)
            for i, L in enumerate(torch.randint(8, 30, (n,), generator=g))]


def fails(main, argv, capsys, *needles) -> str:
    """main(argv) exits with status 2 and an error naming each needle; -> the message."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("field,value", [
    ("K", 0), ("K", 9), ("K", 2.0), ("steps", 0), ("steps", True), ("batch_size", 0), ("batch_size", 65537),
    ("lr", float("inf")), ("lr", float("nan")), ("lr", 2.0), ("lr", -1e-3), ("recall_weight", float("nan")),
    ("recall_weight", -1.0), ("recall_k", V), ("recall_k", -1), ("teacher_top_k", V + 1), ("teacher_top_k", 0),
    ("init_batches", 0), ("seed", -1), ("seed", 2 ** 63), ("mlp_rank", 65), ("extra_layer", 2), ("layer", 4),
    ("warmup", -1), ("depth_decay", 0.0), ("chain", 1), ("method", "eagle"), ("init_from", ""),
])
def test_config_refuses_what_the_model_cannot_train(field, value, tmp_path):
    model = tiny_model(vocab=V, max_seq_len=64)
    cfg = TrainConfig(**{"K": 2, "steps": 1, "init_batches": 1, field: value})
    with pytest.raises(ValueError, match=field):
        train(model, examples(), cfg, tmp_path, progress=False)
    assert not (tmp_path / CHECKPOINT).exists()


@pytest.mark.parametrize("bad,match", [
    (Example([1, 2, V], 0), f"token {V}, not a token id in \\[0, {V}\\)"),
    (Example([1, -1, 3], 0), "token -1"),
    (Example([1, 2.0, 3], 0), "token 2.0"),
    (Example([1, True, 3], 0), "token True"),
    (Example([], 0), "0 tokens"),
    (Example(list(range(V)) * 3, 0), "96 tokens; a sequence needs 1 to 64"),
    (Example([1, 2, 3], -1), "start must be an int in \\[0, 3\\)"),
    (Example([1, 2, 3], 3), "start must be"),
    ("not an example", "must be an Example"),
])
def test_examples_are_checked_against_the_model(bad, match, tmp_path):
    model = tiny_model(vocab=V, max_seq_len=64)
    with pytest.raises(ValueError, match=match):
        train(model, examples() + [bad], TrainConfig(K=2, steps=1, init_batches=1), tmp_path, progress=False)
    with pytest.raises(ValueError, match="eval_every"):
        train(model, examples(), TrainConfig(K=2, steps=1, init_batches=1), tmp_path, progress=False, eval_every=0)


def test_training_that_diverges_stops_before_writing(tmp_path):
    """A frozen model whose logits hold a NaN gives non-finite gradients: training stops at the first step,
    and no checkpoint holds what it made."""
    model = tiny_model(vocab=V, max_seq_len=64)
    with torch.no_grad():
        model.output.weight[3, 0] = float("nan")
    with pytest.raises(ValueError, match="diverged at step 1"):
        train(model, examples(), TrainConfig(K=2, steps=2, save_every=1, init_batches=1), tmp_path, progress=False)
    assert not (tmp_path / CHECKPOINT).exists()


def test_exported_weights_must_fit_fp16(tmp_path):
    model = tiny_model(vocab=V, max_seq_len=64)
    drafter = train(model, examples(), TrainConfig(K=2, steps=1, init_batches=1), tmp_path, progress=False)
    with torch.no_grad():
        drafter.bias[1, 5] = 1e5  # finite in fp32, inf in fp16
    with pytest.raises(ValueError, match="exceed fp16's range"):
        export(drafter, tmp_path, {})
    assert not (tmp_path / "transfer.safetensors").exists()


def test_non_finite_or_foreign_start_weights_are_refused(tmp_path):
    model = tiny_model(vocab=V, max_seq_len=64)
    cfg = dict(K=2, steps=2, init_batches=1)
    maps = random_transfer(model, K=2, layer=2)
    maps.weight[1, 2, 3] = float("nan")
    maps.save(tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match=r"\['weight'\] are not finite at the start"):
        train(model, examples(), TrainConfig(init_from=str(tmp_path / "nan.safetensors"), **cfg), tmp_path / "a",
              progress=False)
    random_transfer(model, K=2, layer=2).save(tmp_path / "maps.safetensors")
    with pytest.raises(ValueError, match="hidden-transfer maps .* not Medusa heads"):
        train(model, examples(), TrainConfig(method="medusa", init_from=str(tmp_path / "maps.safetensors"), **cfg),
              tmp_path / "b", progress=False)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    for path in (tmp_path / "garbage.safetensors", tmp_path):
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            train(model, examples(), TrainConfig(init_from=str(path), **cfg), tmp_path / "c", progress=False)


def _checkpoint(tmp_path, model):
    run = tmp_path / "run"
    train(model, examples(), TrainConfig(K=2, steps=2, init_batches=1), run, progress=False)
    return run / CHECKPOINT


@pytest.mark.parametrize("damage,match", [
    (lambda t, md: (t, {**md, "step": "-3"}), "step '-3', not one of 0..2"),
    (lambda t, md: (t, {**md, "step": "7"}), "step '7'"),
    (lambda t, md: (t, {k: v for k, v in md.items() if k != "config"}), "KeyError"),
    (lambda t, md: (t, {**md, "config": "{not json"}), "JSONDecodeError"),
    (lambda t, md: (t, {**md, "config": "[1]"}), "KeyError"),
    (lambda t, md: ({k: v for k, v in t.items() if k != "adam.exp_avg_sq.bias"}, md), "lacks .*adam.exp_avg_sq.bias"),
    (lambda t, md: ({**t, "adam.exp_avg.weight": t["adam.exp_avg.weight"] * float("nan")}, md), "not finite"),
    (lambda t, md: ({**t, "weight": t["weight"][:1]}, md), "shape \\[1, 64, 64\\]"),
])
def test_damaged_checkpoints_are_refused(damage, match, tmp_path):
    from safetensors import safe_open

    model = tiny_model(vocab=V, max_seq_len=64)
    ckpt = _checkpoint(tmp_path, model)
    with safe_open(str(ckpt), "pt") as f:
        md = f.metadata()
    tensors, md = damage(load_file(ckpt), md)
    save_file(tensors, str(ckpt), metadata=md)
    with pytest.raises(ValueError, match=f"--resume: .*{match}"):
        train(model, examples(), TrainConfig(K=2, steps=2, init_batches=1), ckpt.parent, resume=True, progress=False)


def test_a_checkpoint_that_is_not_safetensors_is_refused(tmp_path):
    model = tiny_model(vocab=V, max_seq_len=64)
    ckpt = _checkpoint(tmp_path, model)
    ckpt.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a checkpoint of this trainer: SafetensorError"):
        train(model, examples(), TrainConfig(K=2, steps=2, init_batches=1), ckpt.parent, resume=True, progress=False)


@pytest.mark.parametrize("line,match", [
    ('{"tokens": [1, 2, 99]}', ":2: token id 99 is outside the model's vocabulary"),
    ('{"tokens": [1, -1]}', ":2: token id -1"),
    ('{"tokens": [1.7, 2]}', ":2: 'tokens' must be a non-empty list of integer"),
    ('{"tokens": ["1", 2]}', ":2: 'tokens' must be"),
    ('{"tokens": [true, 2]}', ":2: 'tokens' must be"),
    ('{"tokens": [[1], 2]}', ":2: 'tokens' must be"),
    ('{"tokens": []}', ":2: 'tokens' must be"),
    ('{"tokens": "1 2 3"}', ":2: 'tokens' must be"),
    ('[1, 2]', ":2: a row must be a JSON object, got list"),
    ('null', ":2: a row must be a JSON object, got NoneType"),
    ('{"tokens": [1, 2', ":2: not a JSON line"),
    ('{"turns": [3]}', ":2: a data row needs a 'prompt' string"),
    ('{"prompt": 5}', ":2: a data row needs"),
])
def test_data_rows_are_refused_with_their_line(line, match, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"tokens": [1, 2, 3]}\n' + line + "\n")
    with pytest.raises(ValueError, match=match):
        load_jsonl(f, vocab_size=40)


def test_data_files_with_a_bom_load_and_binary_ones_are_refused(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"tokens": [1, 2, 3]}\n{"text": "caf\xc3\xa9"}\n')
    assert load_jsonl(f, vocab_size=4) == ([], ["café"], [[1, 2, 3]])
    f.write_bytes(b"\x00\xff\xfe binary")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        load_jsonl(f)


def _data(tmp_path, rows=None):
    f = tmp_path / "data.jsonl"
    f.write_text("".join(json.dumps({"tokens": e.tokens}) + "\n" for e in rows or examples(8)))
    return f


def _train_argv(tmp_path, *extra):
    return ["--out", str(tmp_path / "run"), "--data", str(_data(tmp_path)), "--prompts", "0", "--dtype", "float32",
            "--K", "2", "--steps", "2", "--batch-size", "3", *extra]


@pytest.mark.parametrize("option,value,needle", [
    ("--eval-every", "0", "must be >= 1, got 0"), ("--threads", "0", "must be in [1, 1024], got 0"),
    ("--threads", "-1", "got -1"), ("--threads", "99999999", "got 99999999"), ("--max-len", "0", "must be >= 2"),
    ("--max-len", "-5", "got -5"), ("--gen-batch", "0", "must be >= 1"), ("--gen-tokens", "0", "must be >= 1"),
    ("--prompts", "-1", "must be >= 0"), ("--reading", "-1", "must be >= 0"), ("--held-out", "-1", "must be >= 0"),
    ("--seed", str(2 ** 70), "must be in [0, 9223372036854775807]"), ("--seed", "-1", "got -1"),
    ("--lr", "inf", "finite number in [0.0, 1.0], got inf"), ("--lr", "nan", "got nan"), ("--lr", "2", "got 2.0"),
    ("--recall-weight", "nan", "finite number >= 0.0, got nan"), ("--recall-weight", "-5", "got -5.0"),
    ("--out", "", "non-empty path"), ("--init-from", " ", "non-empty path"), ("--data", "", "non-empty path"),
    ("--device", "foo", "not a device"), ("--device", "cuda:7", "CUDA devices"), ("--steps", "x", "invalid int"),
    ("--steps", "0", "must be >= 1, got 0"), ("--K", "9", "must be in [1, 8], got 9"), ("--K", "0", "got 0"),
    ("--batch-size", "100000", "must be in [1, 65536]"), ("--save-every", "0", "must be >= 1"),
    ("--mlp-rank", "-1", "must be >= 0"), ("--recall-k", "-1", "must be >= 0"), ("--layer", "0", "must be >= 1"),
    ("--extra-layer", "-1", "must be >= 0"),
])
def test_train_cli_refuses_bad_options_by_name(option, value, needle, tmp_path, capsys, model):
    argv = _train_argv(tmp_path)
    fails(train_main, [*argv, option, value], capsys, f"argument {option}", needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra,needles", [
    (["--recall-k", str(V)], ["recall_k must be an int in [0, 31]"]),
    (["--mlp-rank", "65"], ["mlp_rank must be an int in [0, 64]"]),
    (["--layer", "4"], ["layer must be an int in [1, 3]"]),
    (["--max-len", "65"], ["--max-len 65 is more than the model's context of 64"]),
    (["--reading", "2"], ["--reading 2 asks about the model's answers"]),
    (["--resume"], ["--resume: no checkpoint"]),
    (["--init-from", "missing.safetensors"], ["--init-from missing.safetensors: not a readable safetensors file"]),
])
def test_train_cli_refuses_what_the_model_cannot_run(extra, needles, tmp_path, capsys, model):
    fails(train_main, _train_argv(tmp_path, *extra), capsys, *needles)
    assert not (tmp_path / "run" / CHECKPOINT).exists()


def test_train_cli_names_the_data_file_and_line(tmp_path, capsys, model):
    argv = _train_argv(tmp_path)
    (tmp_path / "data.jsonl").write_text('{"tokens": [1, 2, 3]}\n{"tokens": [4, 40]}\n')
    fails(train_main, argv, capsys, "data.jsonl:2: token id 40 is outside the model's vocabulary [0, 32)")


def test_train_cli_defaults_max_len_to_the_models_context_and_remakes_data_that_changed(tmp_path, capsys, model):
    """Sequences longer than the model's 64 positions are cut into windows (not an error of the default
    --max-len 512); the kept OUT/data.jsonl is made again when --data's contents change."""
    rows = examples(4) + [Example(list(range(V)) * 4, 0)]
    argv = ["--out", str(tmp_path / "run"), "--data", str(_data(tmp_path, rows)), "--prompts", "0", "--K", "2",
            "--steps", "1", "--batch-size", "2", "--dtype", "float32"]
    assert train_main(argv) == 0
    kept = [json.loads(r)["tokens"] for r in (tmp_path / "run" / "data.jsonl").read_text().splitlines()]
    assert max(map(len, kept)) == 64 and sum(map(len, kept)) == sum(len(e.tokens) for e in rows)
    _data(tmp_path, examples(3, seed=1))  # the same path, other contents
    assert train_main(argv) == 0
    kept = [json.loads(r)["tokens"] for r in (tmp_path / "run" / "data.jsonl").read_text().splitlines()]
    assert kept == [e.tokens for e in examples(3, seed=1)]


def test_train_cli_refuses_foreign_start_weights_and_checkpoints(tmp_path, capsys, model):
    random_transfer(model, K=2, layer=2).save(tmp_path / "maps.safetensors")
    fails(train_main, _train_argv(tmp_path, "--method", "medusa", "--init-from", str(tmp_path / "maps.safetensors")),
          capsys, "not Medusa heads")
    assert train_main(_train_argv(tmp_path)) == 0
    (tmp_path / "run" / CHECKPOINT).write_bytes(b"garbage")
    fails(train_main, _train_argv(tmp_path, "--resume"), capsys, "--resume:", "not a checkpoint of this trainer")


# ---- dataset, calibrate, refine

def _dataset_argv(tmp_path, *extra):
    return ["--out", str(tmp_path / "ds"), "--dtype", "float32", "--gen-tokens", "3", "--shard-size", "2",
            "--gen-batch", "2", *extra]


@pytest.mark.parametrize("option,value,needle", [
    ("--shard-size", "0", "must be >= 1"), ("--shard-size", "-5", "got -5"), ("--shards", "0", "must be >= 1"),
    ("--shards", "-1", "got -1"), ("--minutes", "nan", "finite number >= 0.0"), ("--minutes", "-1", "got -1.0"),
    ("--gen-batch", "0", "must be >= 1"), ("--gen-tokens", "0", "must be >= 1"), ("--max-prompt", "0", "must be >= 1"),
    ("--seed", "-1", "must be in [0,"), ("--threads", "0", "must be in [1, 1024]"), ("--pool", "", "non-empty"),
])
def test_dataset_cli_refuses_bad_options_by_name(option, value, needle, tmp_path, capsys):
    fails(dataset.main, _dataset_argv(tmp_path, option, value), capsys, f"argument {option}", needle)


def _big_vocab_model(monkeypatch, vocab: int):
    """A tiny model of `vocab` tokens that answers with ids above 2^16, and whose pool is three prompts with such ids."""
    m = tiny_model(vocab=vocab, dim=32, n_layers=2)
    with torch.no_grad():  # logits of 0 below 2^16: greedy answers pick ids above it
        m.output.weight[:1 << 16] = 0
    m.tokenizer = types.SimpleNamespace(eos_token_id=None)
    monkeypatch.setattr(ht_kernels.loading, "load_model", lambda name, dtype, device: m)
    prompts = [[vocab - 1, 5, 65537], [3, 65536], [1]]
    monkeypatch.setattr(dataset, "pool", lambda tok, seed, max_prompt, kind: ([0, 1, 2], prompts))
    return m, prompts


def test_dataset_keeps_token_ids_above_2_to_the_16(tmp_path, monkeypatch, capsys):
    """A vocabulary over 65536 tokens (Qwen2's, Llama 3's) is kept in uint32 shards and pools."""
    m, prompts = _big_vocab_model(monkeypatch, 70000)
    pool = tmp_path / "pool.npz"
    assert dataset.main(_dataset_argv(tmp_path, "--export-pool", str(pool))) == 0
    assert dataset.main(_dataset_argv(tmp_path, "--pool", str(pool))) == 0
    z = np.load(tmp_path / "ds" / "shard-00000.npz")
    assert z["answers"].dtype == np.uint32
    got = dataset.load(tmp_path / "ds", None)
    assert [e.tokens[:e.start + 1] for e in got] == prompts
    assert all(t > 65535 for e in got for t in e.tokens[e.start + 1:])
    assert dataset.load(tmp_path / "ds", None, "held-out") == got[:1]  # pool index 0


@pytest.mark.parametrize("damage,needle", [
    (lambda d: (d / "manifest.json").write_text("{not json"), "manifest.json is not a dataset manifest"),
    (lambda d: (d / "manifest.json").write_text('{"recipe": [], "shards": {}}'), "is not a dataset manifest"),
    (lambda d: (d / "manifest.json").write_text('{"shards": {}}'), "is not a dataset manifest"),
    (lambda d: (d / "shard-00000.npz").write_bytes(b"PK\x03\x04garbage"), "shard-00000.npz is not a shard"),
    (lambda d: np.savez(d / "shard-00000.npz", index=np.arange(2)), "shard-00000.npz is not a shard of a dataset: KeyError"),
    (lambda d: np.savez(d / "shard-00000.npz", index=np.arange(2), prompt_hash=np.arange(2, dtype=np.uint64),
                        offsets=np.array([0, 1, 5]), answers=np.arange(3)), "2 conversations, 2 hashes, 3 offsets"),
    (lambda d: (d / dataset.POOL).write_bytes(b"not a zip"), "pool.npz is not a pool of --export-pool"),
])
def test_damaged_dataset_files_are_refused_by_name(damage, needle, tmp_path, monkeypatch):
    _big_vocab_model(monkeypatch, 70000)
    pool = tmp_path / "pool.npz"
    dataset.main(_dataset_argv(tmp_path, "--export-pool", str(pool)))
    assert dataset.main(_dataset_argv(tmp_path, "--pool", str(pool))) == 0
    damage(tmp_path / "ds")
    with pytest.raises(ValueError, match=needle):
        dataset.load(tmp_path / "ds", None, "train")


def test_a_damaged_pool_is_refused_before_it_is_kept(tmp_path, monkeypatch, capsys):
    _big_vocab_model(monkeypatch, 70000)
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    fails(dataset.main, _dataset_argv(tmp_path, "--pool", str(tmp_path / "bad.npz")), capsys, "bad.npz is not a pool")
    assert not (tmp_path / "ds" / dataset.POOL).exists()


def _frozen_argv(tmp_path, model, *extra):
    random_transfer(model, K=2, layer=2).save(tmp_path / "maps.safetensors")
    return ["--maps", str(tmp_path / "maps.safetensors"), "--dataset", "d", "--out", str(tmp_path / "w.safetensors"),
            *extra]


@pytest.fixture
def frozen(model, monkeypatch):
    data = examples(6)
    monkeypatch.setattr(dataset, "load", lambda path, tok, part: data[:4] if part == "train" else data[4:])
    return model


@pytest.mark.parametrize("main,extra,needles", [
    (calibrate_main, ["--width", "0"], ["argument --width", "must be >= 1"]),
    (calibrate_main, ["--width", str(V + 1)], [f"--width {V + 1} is more than the model's {V} tokens"]),
    (calibrate_main, ["--examples", "-1"], ["argument --examples"]),
    (refine_main, ["--top", "0"], ["argument --top", "must be >= 1"]),
    (refine_main, ["--top", str(V + 1)], [f"--top must be at most the model's {V} tokens", f"--top {V + 1}"]),
    (refine_main, ["--rank", "0"], ["argument --rank"]), (refine_main, ["--rank", "129"], ["--rank 129"]),
    (refine_main, ["--steps", "0"], ["argument --steps"]), (refine_main, ["--batch-size", "-1"], ["argument --batch-size"]),
    (refine_main, ["--lr", "inf"], ["argument --lr"]), (refine_main, ["--weight-decay", "nan"], ["argument --weight-decay"]),
    (refine_main, ["--held-out", "0"], ["argument --held-out"]),
    (refine_main, ["--threads", "0"], ["argument --threads"]), (calibrate_main, ["--device", "cuda:3"], ["--device"]),
])
def test_calibrate_and_refine_refuse_bad_options_by_name(main, extra, needles, tmp_path, capsys, frozen):
    fails(main, _frozen_argv(tmp_path, frozen, *extra), capsys, *needles)
    assert not (tmp_path / "w.safetensors").exists()


@pytest.mark.parametrize("main", [calibrate_main, refine_main])
def test_calibrate_and_refine_refuse_maps_and_outputs_before_the_work(main, tmp_path, capsys, frozen, monkeypatch):
    argv = _frozen_argv(tmp_path, frozen, "--steps", "2") if main is refine_main else _frozen_argv(tmp_path, frozen)
    monkeypatch.setattr(dataset, "load", lambda path, tok, part: 1 / 0)  # no work may start
    fails(main, [*argv, "--out", str(tmp_path / "missing" / "w.safetensors")], capsys, "cannot write a file there")
    fails(main, [*argv, "--out", str(tmp_path)], capsys, "cannot write a file there")
    maps = TransferWeights.load(tmp_path / "maps.safetensors")
    maps.bias[0, 0] = float("inf")
    maps.save(tmp_path / "maps.safetensors")
    fails(main, argv, capsys, "--maps", "['bias'] are not finite")
    random_transfer(tiny_model(vocab=V, dim=32), K=2, layer=2).save(tmp_path / "maps.safetensors")
    fails(main, argv, capsys, "transfer weights must be [K, 64, 64]")
    (tmp_path / "maps.safetensors").write_bytes(b"garbage")
    fails(main, argv, capsys, "not a readable safetensors file")
    fails(main, [*argv, "--maps", str(tmp_path / "none.safetensors")], capsys, "--maps", "no such file")


def test_refine_refuses_features_of_other_arguments(tmp_path, capsys, frozen):
    argv = _frozen_argv(tmp_path, frozen, "--rank", "4", "--top", "3", "--steps", "2", "--batch-size", "8",
                        "--features", str(tmp_path / "f.pt"))
    assert refine_main(argv) == 0
    capsys.readouterr()
    assert refine_main([*argv, "--examples", "3"]) == 2
    assert "--examples 2000 then, 3 now" in capsys.readouterr().err
    random_transfer(frozen, K=2, layer=2).save(tmp_path / "other.safetensors")
    fails(refine_main, [*argv, "--maps", str(tmp_path / "other.safetensors")], capsys, "--maps", "then,")
    (tmp_path / "f.pt").write_bytes(b"garbage")
    fails(refine_main, argv, capsys, "is not a features file of this command")
