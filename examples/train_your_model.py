"""Train hidden-transfer maps for your own model, then decode with them.

The model here is a small random Llama saved as an HF directory (pass `--model DIR` for yours: a Llama,
Qwen2 or Mistral checkpoint with its tokenizer). The trainer answers its built-in prompts with the model
(self-distillation), fits the K maps, and writes DIR/transfer.safetensors; decoding with them gives exactly
the model's own greedy output.

    python examples/train_your_model.py [--model DIR] [--out runs/example] [--steps 20]
"""
import argparse
import tempfile
from pathlib import Path

import ht_kernels as ht
from ht_kernels.train.__main__ import main as train

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--model", help="an HF model directory (default: a small random Llama with SmolLM2's tokenizer)")
p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "ht_example_run"))
p.add_argument("--steps", type=int, default=20)
args = p.parse_args()

if args.model is None:  # a stand-in for your checkpoint: random weights, a real tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = ht.load_model("smollm2-135m").tokenizer
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    args.model = str(Path(args.out) / "model")
    LlamaForCausalLM(config).save_pretrained(args.model)
    tokenizer.save_pretrained(args.model)

if train(["--model", args.model, "--out", args.out, "--dtype", "float32", "--prompts", "8", "--gen-tokens", "24",
          "--steps", str(args.steps), "--batch-size", "4", "--K", "3"]):
    raise SystemExit(2)  # the error is printed

model = ht.load_model(args.model)
dec = ht.HiddenTransferDecoder(model, transfer=Path(args.out) / "transfer.safetensors")
ids = model.tokenizer("The history of the printing press").input_ids
out, ar = dec.generate([ids], max_new_tokens=24), dec.generate_ar([ids], max_new_tokens=24)
steps, n = len(out.accept_lengths[0]) - 1, len(out.sequences[0])
print(f"trained maps: {Path(args.out) / 'transfer.safetensors'}; {steps} steps for {n} tokens; same as plain "
      f"decoding: {out.sequences == ar.sequences}")
assert out.sequences == ar.sequences
