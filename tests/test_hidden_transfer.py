"""ht_kernels.hidden_transfer: every backend against the fp64 reference, out= views, grads, errors."""
import pytest
import torch
from helpers import BACKENDS as BASE_BACKENDS
from helpers import CUDA_BACKEND, DEVICE, DTYPES, assert_close

import ht_kernels
from ht_kernels import BackendUnavailableError
from ht_kernels.reference.hidden_transfer import hidden_transfer_ref

BACKENDS = BASE_BACKENDS + CUDA_BACKEND


def make(lead, D, K, dtype, bias=True, device=DEVICE):
    """hidden [*lead, D], weight [K, D, D] scaled to keep outputs O(1), bias [K, D] or None."""
    hidden = torch.randn(*lead, D, device=device).to(dtype)
    weight = (torch.randn(K, D, D, device=device) / D**0.5).to(dtype)
    return hidden, weight, torch.randn(K, D, device=device).to(dtype) if bias else None


def ref64(hidden, weight, bias):
    return hidden_transfer_ref(hidden.double(), weight.double(), None if bias is None else bias.double())


# (leading shape, D, K, bias): every D, K and leading shape of the spec, D = 33 odd, D = 576 large.
CASES = [((), 32, 1, True), ((1,), 64, 3, False), ((7,), 80, 5, True), ((3, 5), 128, 3, True),
         ((130,), 80, 1, False), ((130,), 64, 5, True), ((7,), 576, 3, True), ((3, 5), 33, 2, False)]


@pytest.mark.parametrize("lead,D,K,bias", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, dtype, lead, D, K, bias):
    hidden, weight, b = make(lead, D, K, dtype, bias)
    out = ht_kernels.hidden_transfer(hidden, weight, b, backend=backend)
    assert out.dtype == dtype and out.device == hidden.device
    assert_close(out, ref64(hidden, weight, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend, dtype):
    """hidden with a stride-2 feature dim and transposed rows; a transposed weight and strided bias."""
    D, K = 80, 3
    hiddens = [torch.randn(3, 5, 2 * D, device=DEVICE).to(dtype)[..., ::2],
               torch.randn(D, 7, device=DEVICE).to(dtype).T]
    weight = (torch.randn(K, D, D, device=DEVICE) / D**0.5).to(dtype).transpose(1, 2)
    bias = torch.randn(D, K, device=DEVICE).to(dtype).T
    for hidden in hiddens:
        out = ht_kernels.hidden_transfer(hidden, weight, bias, backend=backend)
        assert_close(out, ref64(hidden, weight, bias), dtype)


def _view(buf, layout):
    """A view [..., K, D] of buf that is not contiguous: every dim strided, or unmergeable rows."""
    if layout == "interleaved":   # buf [T, 1 + K, D]: the pseudo slots after each real token
        return buf[:, 1:]
    if layout == "every_dim":     # buf [3, 10, K + 2, 2 D]
        return buf[:, ::2, 1:-1, ::2]
    return buf[:, 1:6, :, 1:-1]   # buf [3, 8, K, D + 2]: leading dims that do not merge


@pytest.mark.parametrize("layout", ["interleaved", "every_dim", "unmergeable"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_out_strided_view(backend, dtype, layout):
    D, K = 80, 3
    shape = {"interleaved": (7, 1 + K, D), "every_dim": (3, 10, K + 2, 2 * D), "unmergeable": (3, 8, K, D + 2)}
    buf = torch.full(shape[layout], float("nan"), device=DEVICE, dtype=dtype)
    out = _view(buf, layout)
    hidden, weight, bias = make(out.shape[:-2], D, K, dtype)
    if layout == "interleaved":   # the real tokens' hidden states share the buffer with the outputs
        buf[:, 0] = hidden
        hidden = buf[:, 0]
    before = buf.clone()
    result = ht_kernels.hidden_transfer(hidden, weight, bias, out=out, backend=backend)
    assert result is out
    assert_close(out, ref64(hidden, weight, bias), dtype)
    inside = torch.zeros_like(buf, dtype=torch.bool)
    _view(inside, layout).fill_(True)
    torch.testing.assert_close(buf[~inside], before[~inside], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_fp64(bias):
    hidden, weight, b = make((2, 3), 4, 2, torch.float64, bias, device="cpu")
    inputs = [t.requires_grad_() for t in (hidden, weight, b) if t is not None]
    fn = lambda h, w, *b: torch.ops.ht_kernels.hidden_transfer(h, w, b[0] if b else None, "torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("K,D", [(0, 4), (2, 0)])
def test_grads_of_empty_maps(K, D):
    """No map (K = 0) or no feature (D = 0): empty outputs, and gradients of the inputs' shapes (zeros)."""
    hidden, weight = torch.randn(3, D, requires_grad=True), torch.randn(K, D, D, requires_grad=True)
    out = ht_kernels.hidden_transfer(hidden, weight)
    out.sum().backward()
    assert out.shape == (3, K, D) and hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape
    assert not hidden.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_match_reference(backend):
    hidden, weight, bias = make((3, 5), 80, 3, torch.float32)
    grad_out = torch.randn(3, 5, 3, 80, device=DEVICE)
    grads = []
    for fn, args in ((ht_kernels.hidden_transfer, (hidden, weight, bias)),
                     (hidden_transfer_ref, tuple(t.double() for t in (hidden, weight, bias)))):
        args = [t.detach().requires_grad_() for t in args]
        kwargs = {"backend": backend} if fn is ht_kernels.hidden_transfer else {}
        (fn(*args, **kwargs) * grad_out.to(args[0].dtype)).sum().backward()
        grads.append([t.grad for t in args])
    for name, g, g_ref in zip(("hidden", "weight", "bias"), *grads):
        assert g.dtype == torch.float32
        assert_close(g, g_ref, torch.float32, what=f"grad of {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    hidden, weight, bias = make((5,), 32, 2, torch.float32)
    out = torch.full((5, 4, 32), float("nan"), device=DEVICE)[:, 1:3]
    torch.library.opcheck(torch.ops.ht_kernels.hidden_transfer_out.default, (hidden, weight, bias, out, backend))
    for b in (bias, None):
        args = (hidden.requires_grad_(), weight.requires_grad_(), b, backend)
        torch.library.opcheck(torch.ops.ht_kernels.hidden_transfer.default, args)


def test_compile_fullgraph_matches_eager():
    hidden, weight, bias = make((7,), 64, 3, torch.float32, device="cpu")

    def step(h, w, b):
        return ht_kernels.hidden_transfer(torch.tanh(h), w, b, backend="torch").sum(-2)

    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(hidden, weight, bias), step(hidden, weight, bias))


def _bad_inputs():
    h, w, b = make((7,), 16, 2, torch.float32, device="cpu")
    out, big = torch.empty(7, 2, 16), torch.randn(1024)
    return [  # (hidden, weight, bias, out, argument named in the message)
        (h[0, 0], w, b, None, "hidden"), (h[:, :8], w, b, None, "hidden"),
        (h.double(), w.double(), b.double(), None, "hidden"), (h.int(), w.int(), None, None, "hidden"),
        (h, w[0], b, None, "weight"), (h, w[:, :, :8], b, None, "weight"), (h, w.half(), b, None, "weight"),
        (h, w.to("meta"), b, None, "weight"), (h, w, b[0], None, "bias"), (h, w, b[:, :8], None, "bias"),
        (h, w, b.half(), None, "bias"), (h, w, b.to("meta"), None, "bias"), (h, w, b, out[:, :1], "out"),
        (h, w, b, out[None], "out"), (h, w, b, out.half(), "out"), (h, w, b, out.to("meta"), "out"),
        (h.clone().requires_grad_(), w, b, out, "out"),
        (h, w, b, out[:, :1].expand(7, 2, 16), "out"),                         # written through stride 0
        (out[:, 0], w, b, out, "hidden"),                                     # hidden is out's first map
        (h, big[:512].view(2, 16, 16), b, big[500:724].view(7, 2, 16), "weight"),  # 12 elements in both
        (h, w, big[:32].view(2, 16), big[16:240].view(7, 2, 16), "bias"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_input_raises(case):
    hidden, weight, bias, out, name = _bad_inputs()[case]
    with pytest.raises(ValueError, match=rf"hidden_transfer: .*\b{name}\b"):
        ht_kernels.hidden_transfer(hidden, weight, bias, out=out, backend="torch")


def test_unavailable_backends_raise(monkeypatch):
    hidden, weight, bias = make((7,), 16, 2, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="backend"):
        ht_kernels.hidden_transfer(hidden, weight, bias, backend="numpy")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        ht_kernels.hidden_transfer(hidden, weight, bias, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="triton"):
        ht_kernels.hidden_transfer(hidden, weight, bias, backend="triton")


@pytest.mark.cuda
def test_cuda_kernel_choice():
    """The cases above run both CUDA kernels: tensor cores for fp16/bf16 rows of 16-byte multiples, SIMT else."""
    from ht_kernels.cuda.hidden_transfer import kernel_name

    for dtype, D, want in ((torch.bfloat16, 64, "mma"), (torch.float16, 80, "mma"), (torch.bfloat16, 33, "simt"),
                           (torch.float32, 64, "simt")):
        hidden, weight, _ = make((3,), D, 2, dtype)
        assert kernel_name(hidden, weight) == want, (dtype, D)
