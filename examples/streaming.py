"""Stream a hidden-transfer generation: text appears as each step's accepted tokens arrive.

    python examples/streaming.py [--prompt "..."] [--max-new-tokens 64]
"""
import argparse
import sys

import ht_kernels as ht
from ht_kernels.cpu import best_dtype

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--prompt", default="Write a haiku about the sea.")
p.add_argument("--max-new-tokens", type=int, default=64)
args = p.parse_args()

dtype, exact, _ = best_dtype("cpu")                         # bf16, bit-exact, where the CPU has bf16 kernels
model = ht.load_model("smollm2-135m", dtype=dtype)
tok = model.tokenizer
dec = ht.HiddenTransferDecoder(model, exact=exact)         # the maps shipped for SmolLM2
ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                              return_dict=False)
tokens, printed = [], ""


def on_step(new):                                           # new: this step's tokens, one list per row
    global printed
    tokens.extend(new[0])
    text = tok.decode(tokens, skip_special_tokens=True)
    if not text.endswith("\ufffd"):                         # hold back a half-decoded character
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text


out = dec.generate([ids], max_new_tokens=args.max_new_tokens, callback=on_step)  # ends at the end of the turn
steps = len(out.accept_lengths[0]) - 1
print(f"\n[{len(out.sequences[0])} tokens in {steps + 1} forward passes]")
