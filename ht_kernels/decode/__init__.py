"""Lossless decoding: the hidden-transfer decoder and plain decoding (`decoder`), draft trees, sampling,
CUDA-graph steps, transfer weights, tree auto and the replay of greedy decoding from teacher-forced drafts."""
