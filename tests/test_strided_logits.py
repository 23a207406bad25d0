"""The log-prob launchers on [R, T, V] logits read in place: `logits[:, :-1]` of a model's [R, T + 1, V] output, a
batch-transposed view and a contiguous [R, T, V], on both kernel backends (ops/logprobs.py, the native csrc/).

The oracle is the same launcher on `x.contiguous().reshape(-1, V)`, which test_logprobs.py holds against the float64
reference: values and gradients must be equal bit for bit (the launch config depends on V, the dtype and whether the
strides are 16-divisible, which every case here shares with its contiguous copy). The gradient comes back shaped like
the logits (a new contiguous tensor), or written into the strided view in place without touching anything around it.
"""

import pytest
import torch
from conftest import DEVICE, DTYPES

from dpo_kernels import cpu
from dpo_kernels.ops import logprobs as triton_ops

IGNORE = -100
TRITON = pytest.param(triton_ops, id="triton", marks=pytest.mark.triton)
CPU = pytest.param(cpu, id="cpu")

# (R, T, V): V a power of two or not (37: no 16-divisible stride, scalar loads on a GPU), a single batch row, a single
# position, a single column, a single logit.
SHAPES = [(3, 5, 37), (2, 4, 64), (1, 6, 50), (4, 1, 33), (3, 4, 1), (1, 1, 1)]
LAYOUTS = ["shifted", "transposed", "shifted_transposed", "contiguous"]


@pytest.fixture(params=[TRITON, CPU])
def kernels(request):
    if request.param is cpu and not cpu.available():
        pytest.fail("the native CPU backend is not available (its build failed, or DPO_KERNELS_CPU_BACKEND=reference)")
    return request.param


@pytest.fixture
def device(kernels) -> str:
    return "cpu" if kernels is cpu else DEVICE


def _base(layout: str, R: int, T: int, V: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, x): x is the [R, T, V] view of `base` the layout names."""
    shift = layout.startswith("shifted")
    T_base = T + 1 if shift else T
    if layout.endswith("transposed"):
        base = (torch.randn(T_base, R, V, device=device) * 3).to(dtype)
        x = base.transpose(0, 1)
    else:
        base = (torch.randn(R, T_base, V, device=device) * 3).to(dtype)
        x = base
    x = x[:, :T] if shift else x
    assert x.shape == (R, T, V) and x.stride(-1) == 1
    return base, x


def _labels(R: int, T: int, V: int, device) -> torch.Tensor:
    """Random labels [R·T], the edges included (column 0 and V - 1), and one ignored position when there are two."""
    labels = torch.randint(0, V, (R * T,))
    labels[0] = 0
    if R * T > 1:
        labels[-1] = V - 1
        labels[R * T // 2] = IGNORE
    return labels.to(device)


def _launch(kernels, x, labels, g, g_h, **opts):
    """Forward with stats, then the gradient of the log-probs alone and with the entropy term."""
    logps, lse, stats = kernels.logprobs_fwd(x, labels, return_stats=True, **opts)
    d = kernels.logprobs_bwd(x, labels, lse, g, **opts)
    d_h = kernels.logprobs_bwd(x, labels, lse, g, grad_entropy=g_h, entropy=stats[0], **opts)
    return (logps, lse, stats), (d, d_h)


def _assert_equal(out: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("R, T, V", SHAPES, ids=lambda v: str(v))
def test_logprobs_strided_3d(kernels, device, R, T, V, layout, dtype):
    """[R, T, V] views give the bits of the contiguous [R·T, V] copy: log-probs, lse, stats, both gradients."""
    opts = dict(ignore_index=IGNORE, temperature=0.8)
    _, x = _base(layout, R, T, V, DTYPES[dtype], device)
    labels = _labels(R, T, V, device)
    g, g_h = torch.randn(R * T, device=device), torch.randn(R * T, device=device)
    fwd, grads = _launch(kernels, x, labels, g, g_h, **opts)
    fwd_c, grads_c = _launch(kernels, x.contiguous().reshape(-1, V), labels, g, g_h, **opts)
    for name, out, out_c in zip(("logps", "lse", "stats"), fwd, fwd_c):
        _assert_equal(out, out_c, name)
    for name, d, d_c in zip(("dlogits", "dlogits+entropy"), grads, grads_c):
        assert d.shape == x.shape and d.is_contiguous() and d.dtype == x.dtype, name
        _assert_equal(d.reshape(-1, V), d_c, name)
    assert torch.isfinite(fwd[0]).all() and torch.isfinite(grads[1]).all()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["shifted", "shifted_transposed", "transposed"])
@pytest.mark.parametrize("R, T, V", [(3, 5, 37), (2, 3, 64), (1, 1, 1)], ids=lambda v: str(v))
def test_logprobs_strided_3d_inplace(kernels, device, R, T, V, layout, dtype):
    """inplace=True writes the gradient into the strided view (the same bits as out of place) and returns it; the
    base's last position (not part of logits[:, :-1]) keeps its values."""
    opts = dict(ignore_index=IGNORE, temperature=1.3)
    base, x = _base(layout, R, T, V, DTYPES[dtype], device)
    untouched = base.clone()
    labels = _labels(R, T, V, device)
    g, g_h = torch.randn(R * T, device=device), torch.randn(R * T, device=device)
    _, lse, stats = kernels.logprobs_fwd(x, labels, return_stats=True, **opts)
    results = []
    for grad_entropy in (None, g_h):
        grad_opts = dict(grad_entropy=grad_entropy, entropy=None if grad_entropy is None else stats[0], **opts)
        expected = kernels.logprobs_bwd(x, labels, lse, g, **grad_opts)
        work_base, work = _base(layout, R, T, V, DTYPES[dtype], device)
        work_base.copy_(untouched)
        out = kernels.logprobs_bwd(work, labels, lse, g, inplace=True, **grad_opts)
        results.append((expected, work_base, work, out))
    for expected, work_base, work, out in results:
        assert out.data_ptr() == work.data_ptr() and out.stride() == work.stride() and out.shape == work.shape
        _assert_equal(out, expected, "in-place gradient")
        if layout.startswith("shifted"):  # the position logits[:, :-1] leaves out
            last = (slice(None), -1) if layout == "shifted" else (-1,)
            _assert_equal(work_base[last], untouched[last], "base outside the view")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_logprobs_strided_labels_shaped(kernels, device, dtype):
    """Labels [R, T] give what the flat [R·T] labels give; [N, V] logits are [N, 1, V] logits."""
    R, T, V = 2, 3, 45
    _, x = _base("shifted", R, T, V, DTYPES[dtype], device)
    labels = _labels(R, T, V, device)
    g, g_h = torch.randn(R * T, device=device), torch.randn(R * T, device=device)
    flat = _launch(kernels, x, labels, g, g_h)
    shaped = _launch(kernels, x, labels.view(R, T), g, g_h)
    rows = x.contiguous().view(R * T, V)
    as_3d = _launch(kernels, rows.unsqueeze(1), labels, g, g_h)
    as_2d = _launch(kernels, rows, labels, g, g_h)
    for a, b in zip((*flat[0], *flat[1]), (*shaped[0], *shaped[1])):
        _assert_equal(a, b, "labels [R, T]")
    for a, b in zip((*as_3d[0], *as_3d[1]), (*as_2d[0], *as_2d[1])):
        _assert_equal(a.reshape(b.shape), b, "[N, 1, V]")


@pytest.mark.parametrize("stats", [False, True], ids=["plain", "stats"])
def test_logprobs_strided_empty(kernels, device, stats):
    """R = 0 or T = 0: empty outputs, a gradient of the logits' shape."""
    for R, T in ((0, 4), (3, 0)):
        base = torch.randn(R, T + 1, 16, device=device, dtype=torch.bfloat16)
        x, labels = base[:, :-1], torch.zeros(R * T, dtype=torch.long, device=device)
        logps, lse, st = kernels.logprobs_fwd(x, labels, return_stats=stats)
        d = kernels.logprobs_bwd(x, labels, lse, torch.zeros(R * T, device=device))
        assert logps.shape == lse.shape == (0,) and d.shape == x.shape
        assert (st is None) if not stats else st.shape == (4, 0)


# The native backend's own: the operators' checks.


def test_cpu_ops_strided_checks():
    """The operators refuse labels of the wrong size and an in-place gradient into overlapping [R, T, V] logits;
    opcheck passes on a strided view."""
    if not cpu.available():
        pytest.fail("the native CPU backend is not available")
    ops = torch.ops.dpo_kernels
    base = torch.randn(2, 5, 40)
    x, labels = base[:, :-1], torch.randint(0, 40, (8,))
    with pytest.raises(RuntimeError, match="labels must be"):
        ops.logprobs_fwd(x, labels[:7], -100, 1.0, False)
    _, lse, stats = cpu.logprobs_fwd(x, labels, return_stats=True)
    overlapping = torch.randn(1, 1, 40).expand(2, 4, 40).clone().as_strided((2, 4, 40), (40, 40, 1))
    with pytest.raises(RuntimeError, match="do not share memory"):
        ops.logprobs_bwd_(overlapping, labels, lse, torch.ones(8), None, None, -100, 1.0)
    bwd_args = (labels, lse, torch.randn(8), torch.randn(8), stats[0].contiguous(), -100, 0.9)
    torch.library.opcheck(ops.logprobs_fwd.default, (x, labels, -100, 0.9, True))
    torch.library.opcheck(ops.logprobs_fwd.default, (x, labels.view(2, 4), -100, 1.0, False))
    torch.library.opcheck(ops.logprobs_bwd.default, (x, *bwd_args))
    torch.library.opcheck(ops.logprobs_bwd_.default, (base.clone()[:, :-1], *bwd_args))
