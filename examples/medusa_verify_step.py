"""A Medusa-style verification step written against plain PyTorch, with ht_kernels.tree_attention swapped in.

A tiny random attention stack keeps a KV cache; a step feeds a tree of candidate tokens (the root and the
top-2 guesses of two heads), attends the cached prefix plus each node's ancestors, and accepts the longest
path the model agrees with. The attention runs twice, once as plain masked softmax attention and once as
`ht.tree_attention` (which also writes the tree's keys/values into the cache), and the two must agree.

    python examples/medusa_verify_step.py [--prefix 50] [--seed 0]
"""
import argparse
import math

import torch

import ht_kernels as ht

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--prefix", type=int, default=50)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
torch.manual_seed(args.seed)

B, Hq, Hkv, D, V, S = 2, 4, 2, 32, 100, 256
embed, wq, wk, wv, head = (torch.randn(V, Hq * D) / 4, torch.randn(Hq * D, Hq * D) / 16,
                           torch.randn(Hq * D, Hkv * D) / 16, torch.randn(Hq * D, Hkv * D) / 16,
                           torch.randn(Hq * D, V) / 8)
k_cache, v_cache = torch.zeros(B, S, Hkv, D), torch.zeros(B, S, Hkv, D)
lengths = torch.full((B,), args.prefix, dtype=torch.int32)
k_cache[:, :args.prefix], v_cache[:, :args.prefix] = torch.randn(2, B, args.prefix, Hkv, D)

# The candidate tree: root r; two guesses a, b of the next token; under each two guesses of the one after.
parents = [-1, 0, 0, 1, 1, 2, 2]
tree = ht.Tree.from_parents(parents)
tokens = torch.randint(0, V, (B, len(parents)))


def plain_attention(q, k, v, prefix: int, mask):
    """q [T, Hq, D]; k, v [prefix + T, Hkv, D]; mask [T, T]: what every PyTorch tree decoder does by hand."""
    k, v = (x.repeat_interleave(Hq // Hkv, dim=1) for x in (k, v))
    scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(D)
    visible = torch.cat([torch.ones(len(q), prefix, dtype=torch.bool), mask], dim=1)
    return torch.einsum("hts,shd->thd", scores.masked_fill(~visible, -math.inf).softmax(-1), v)


x = embed[tokens]                                                            # [B, T, Hq * D]
q = (x @ wq).view(B, -1, Hq, D)
k, v = (x @ wk).view(B, -1, Hkv, D), (x @ wv).view(B, -1, Hkv, D)
by_hand = torch.stack([plain_attention(q[b], torch.cat([k_cache[b, :args.prefix], k[b]]),
                                       torch.cat([v_cache[b, :args.prefix], v[b]]), args.prefix, tree.ancestor_mask)
                       for b in range(B)])
fused = ht.tree_attention(q, k_cache, v_cache, lengths, tree.ancestor_mask, k=k, v=v)  # the swap: one call
err = (fused - by_hand).abs().max().item()
print(f"tree_attention vs plain attention: max abs difference {err:.2e}")
assert err < 1e-4

logits = fused.reshape(B, -1, Hq * D) @ head                                  # [B, T, V]
accepted, accept_len = ht.verify_tree_greedy(tokens, torch.tensor(parents), logits.argmax(-1))
ht.compact_kv(k_cache, v_cache, lengths, accepted, accept_len)              # keep the accepted path's K/V
for b in range(B):
    path = accepted[b, :accept_len[b]].tolist()
    print(f"row {b}: accepted nodes {path}, tokens {tokens[b, path].tolist()}")
