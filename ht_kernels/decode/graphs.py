"""A decoding step recorded once as a CUDA graph and replayed, so a step costs one launch on the host.

The step is a function over static tensors (the cache, the root and drafts it advances in place, the
buffer it writes its tokens to) with fixed shapes and no host synchronisation: every launch of the
graph redoes the same work on the tensors' current values.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch


class StepGraph:
    """Calls `step()` eagerly for `warmup` calls, then records it as a CUDA graph and replays it.

    The warm-up calls are real steps; they compile and tune the kernels (which must not happen while
    recording). The recording does not run the step, so the call that records also replays. If the
    step cannot be recorded (an op that reads a device value on the host, say), it warns once and
    goes on eagerly; `graph` is then None and `error` says why.
    """

    WARMUP = 2

    def __init__(self, step: Callable[[], None], device: torch.device, warmup: int = WARMUP):
        if device.type != "cuda":
            raise ValueError(f"StepGraph: CUDA graphs need a CUDA device, got {device}")
        self.step, self.device, self.warmup = step, device, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.error: str | None = None
        self._calls = 0

    def __call__(self) -> None:
        self._calls += 1
        if self.graph is not None:
            self.graph.replay()
        elif self.error is not None:
            self.step()
        elif self._calls <= self.warmup:
            self._warm()
        else:
            self._record()

    def _warm(self) -> None:
        """One eager step on a side stream, as recording wants its warm-up (torch.cuda.graphs docs)."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self.step()
        current.wait_stream(side)

    def _record(self) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.step()
        except Exception as e:  # nothing ran while recording: the step is redone eagerly
            self.error = f"{type(e).__name__}: {e}"
            warnings.warn(f"decoding step not recorded as a CUDA graph, running eagerly: {self.error}",
                          RuntimeWarning, stacklevel=3)
            torch.cuda.synchronize(self.device)
            self.step()
            return
        self.graph = graph
        graph.replay()
