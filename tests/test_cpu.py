"""The native CPU backend (csrc/ through dpo_kernels.cpu) against the float64 reference.

Values, stats and gradients (random upstream gradients, direct launcher calls) for every dtype,
ignore_index, temperature, strided rows, in place and the edge cases; then the operators themselves
(schemas, opcheck, torch.compile) and the fallback when the build fails.
"""

import warnings

import pytest
import torch
from conftest import DTYPES, assert_grad_close, assert_out_close

from dpo_kernels import cpu, reference

# The tests that exercise the fallback itself and run whether or not the build works.
WITHOUT_BUILD = {
    "test_fallback_when_build_fails",
    "test_fallback_when_compile_fails",
    "test_forced_reference_backend",
}


@pytest.fixture(autouse=True)
def _native(request):
    """Every other test needs the build (made, or loaded from the cache, on the first call)."""
    if request.function.__name__ not in WITHOUT_BUILD and not cpu.available():
        pytest.skip("the native CPU backend did not build (see the RuntimeWarning)")


CASES = [
    pytest.param(1, 7, id="N1-V7"),  # one row, a vocabulary smaller than any vector
    pytest.param(6, 100, id="N6-V100"),
    pytest.param(33, 1001, id="N33-V1001"),  # odd V, odd N: vector tails on both
    pytest.param(5, 2049, id="N5-V2049"),  # one element past a 2048-value chunk
    pytest.param(9, 5000, id="N9-V5000"),  # several chunks and a ragged last one
]


def make_inputs(N, V, dtype, *, scale=3.0, p_ignore=0.25):
    logits = (scale * torch.randn(N, V)).to(dtype)
    labels = torch.randint(0, V, (N,))
    labels[torch.rand(N) < p_ignore] = -100
    return logits, labels


def oracle(
    logits,
    labels,
    *,
    grad_logps=None,
    grad_entropy=None,
    ignore_index=-100,
    temperature=1.0,
):
    """float64 reference: logps, lse, stats [4, N] and, with upstream gradients, d/dlogits."""
    x = logits.double().requires_grad_(True)
    logps, stats = reference.token_logps(
        x, labels, ignore_index=ignore_index, temperature=temperature, return_stats=True
    )
    lse = torch.logsumexp(x.detach() / temperature, dim=-1)
    stats_t = torch.stack([s.detach().double() for s in stats])
    grad = None
    if grad_logps is not None:
        outputs, grads = [logps], [grad_logps.double()]
        if grad_entropy is not None:
            outputs.append(stats.entropy)
            grads.append(grad_entropy.double())
        (grad,) = torch.autograd.grad(outputs, x, grads)
    return logps.detach(), lse, stats_t, grad


def torch_grad(logits, labels, grad_logps, ignore_index=-100, temperature=1.0):
    """Plain torch in the logits' own dtype (the `out_pt` of the tolerance rule)."""
    x = logits.detach().requires_grad_(True)
    logp = torch.log_softmax(x / temperature, dim=-1)
    safe = labels.masked_fill(labels == ignore_index, 0)
    out = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1).masked_fill(labels == ignore_index, 0)
    (grad,) = torch.autograd.grad(out, x, grad_logps.to(out.dtype))
    return grad


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("N, V", CASES)
@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["T1", "T0.7"])
def test_logprobs_fwd(N, V, dtype, temperature):
    logits, labels = make_inputs(N, V, dtype)
    logps, lse, stats = cpu.logprobs_fwd(logits, labels, temperature=temperature, return_stats=True)
    logps_only, lse_only, none = cpu.logprobs_fwd(logits, labels, temperature=temperature)
    logps_ref, lse_ref, stats_ref, _ = oracle(logits, labels, temperature=temperature)
    scored = labels != -100
    assert logps.dtype == lse.dtype == stats.dtype == torch.float32 and stats.shape == (4, N)
    assert none is None
    assert_out_close(logps, logps_ref)
    assert torch.equal(logps_only, logps) and torch.equal(lse_only[scored], lse[scored])
    assert_out_close(lse[scored], lse_ref[scored])
    assert_out_close(stats[[0, 1, 3]], stats_ref[[0, 1, 3]])
    assert torch.equal(stats[2], stats_ref[2].float())  # is_top1 exactly
    assert (logps[~scored] == 0).all() and (stats[:, ~scored] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("N, V", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0], ids=["T1", "T2"])
@pytest.mark.parametrize("with_entropy", [False, True], ids=["logps", "logps+entropy"])
def test_logprobs_bwd(N, V, dtype, temperature, with_entropy):
    logits, labels = make_inputs(N, V, dtype)
    grad_logps = torch.randn(N)
    grad_entropy = torch.randn(N) if with_entropy else None
    _, lse, stats = cpu.logprobs_fwd(logits, labels, temperature=temperature, return_stats=True)
    grad = cpu.logprobs_bwd(
        logits,
        labels,
        lse,
        grad_logps,
        temperature=temperature,
        grad_entropy=grad_entropy,
        entropy=stats[0],
    )
    upstream = dict(grad_logps=grad_logps, grad_entropy=grad_entropy)
    *_, grad_ref = oracle(logits, labels, temperature=temperature, **upstream)
    grad_pt = torch_grad(logits, labels, grad_logps, temperature=temperature)
    assert grad.dtype == dtype and grad.shape == (N, V) and grad.is_contiguous()
    assert_grad_close(grad, grad_ref, None if with_entropy else grad_pt)
    assert (grad[labels == -100] == 0).all()


def test_logprobs_bwd_without_grad_logps():
    """Only the entropy carries a gradient (grad_logps=None), and nothing at all gives zeros."""
    logits, labels = make_inputs(7, 300, torch.float32)
    grad_entropy = torch.randn(7)
    _, lse, stats = cpu.logprobs_fwd(logits, labels, return_stats=True)
    grad = cpu.logprobs_bwd(logits, labels, lse, None, grad_entropy=grad_entropy, entropy=stats[0])
    zeros = cpu.logprobs_bwd(logits, labels, lse, None)
    x = logits.double().requires_grad_(True)
    _, stats_ref = reference.token_logps(x, labels, return_stats=True)
    (grad_ref,) = torch.autograd.grad(stats_ref.entropy, x, grad_entropy.double())
    assert_grad_close(grad, grad_ref)
    assert (zeros == 0).all()


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_strided_rows_and_inplace(dtype):
    """Rows of a wider buffer (row stride V + 37) are read where they are, and the in-place
    gradient lands in the view without touching the columns beyond V."""
    N, V = 11, 1001
    buffer = (3 * torch.randn(N, V + 37)).to(dtype)
    logits = buffer[:, :V]
    labels = torch.randint(0, V, (N,))
    labels[2] = -100
    grad_logps, grad_entropy = torch.randn(N), torch.randn(N)
    logps, lse, stats = cpu.logprobs_fwd(logits, labels, return_stats=True)
    logps_c, lse_c, stats_c = cpu.logprobs_fwd(logits.contiguous(), labels, return_stats=True)
    kwargs = dict(grad_entropy=grad_entropy, entropy=stats[0])
    grad = cpu.logprobs_bwd(logits, labels, lse, grad_logps, **kwargs)
    tail = buffer[:, V:].clone()
    out = cpu.logprobs_bwd(logits, labels, lse, grad_logps, inplace=True, **kwargs)
    assert torch.equal(logps, logps_c) and torch.equal(stats, stats_c)
    assert out.data_ptr() == buffer.data_ptr() and out.stride() == (V + 37, 1)
    assert torch.equal(buffer[:, :V], grad)
    assert torch.equal(buffer[:, V:], tail)


def test_inplace_contiguous_bitwise():
    logits, labels = make_inputs(16, 5000, torch.bfloat16)
    grad_logps = torch.randn(16)
    _, lse, _ = cpu.logprobs_fwd(logits, labels)
    grad = cpu.logprobs_bwd(logits, labels, lse, grad_logps)
    out = cpu.logprobs_bwd(logits, labels, lse, grad_logps, inplace=True)
    assert out is logits and torch.equal(logits, grad)


@pytest.mark.parametrize("ignore_index", [-100, 0, 5])
def test_ignore_index(ignore_index):
    """Any ignore_index, including one that is also a valid class index."""
    N, V = 12, 100
    logits, _ = make_inputs(N, V, torch.float32)
    labels = torch.randint(0, V, (N,))
    labels[::3] = ignore_index
    grad_logps = torch.randn(N)
    opts = dict(ignore_index=ignore_index)
    logps, lse, stats = cpu.logprobs_fwd(logits, labels, return_stats=True, **opts)
    grad = cpu.logprobs_bwd(logits, labels, lse, grad_logps, **opts)
    logps_ref, _, stats_ref, grad_ref = oracle(logits, labels, grad_logps=grad_logps, **opts)
    assert_out_close(logps, logps_ref)
    assert_out_close(stats, stats_ref)
    assert_grad_close(grad, grad_ref)


def test_every_row_ignored_and_zero_rows():
    logits, _ = make_inputs(4, 100, torch.float16)
    labels = torch.full((4,), -100)
    logps, lse, stats = cpu.logprobs_fwd(logits, labels, return_stats=True)
    grad = cpu.logprobs_bwd(logits, labels, lse, torch.randn(4))
    assert (logps == 0).all() and (stats == 0).all() and (grad == 0).all()

    empty = torch.empty(0, 100, dtype=torch.bfloat16)
    no_labels = torch.empty(0, dtype=torch.long)
    logps, lse, stats = cpu.logprobs_fwd(empty, no_labels, return_stats=True)
    grad = cpu.logprobs_bwd(empty, no_labels, lse, logps, inplace=False)
    assert logps.shape == lse.shape == (0,) and stats.shape == (4, 0)
    assert grad.shape == (0, 100) and grad.dtype == torch.bfloat16


def test_top1_first_argmax():
    """TRL's tie rule: the label is top-1 only as the first maximal index, also across chunks."""
    V = 5000
    logits = torch.zeros(6, V)
    for row in range(6):
        logits[row, [3, 7, 3001]] = 5.0
    labels = torch.tensor([3, 7, 3001, 0, -100, 4999])
    _, _, stats = cpu.logprobs_fwd(logits, labels, return_stats=True)
    assert stats[2].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    logits[:, 3001] = 6.0  # a strictly larger maximum in a later chunk takes over
    _, _, stats = cpu.logprobs_fwd(logits, labels, return_stats=True)
    assert stats[2].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]


def test_uniform_and_extreme_logits():
    """Equal logits give −log V; a large common offset and −inf entries (a masked vocabulary) stay
    exact; −inf entries get exactly zero gradient."""
    V = 3000
    logits = torch.zeros(4, V)
    logits[1] += 1e4
    logits[2] = 3 * torch.randn(V) - 1e4
    logits[3] = 3 * torch.randn(V)
    logits[3, ::2] = float("-inf")
    labels = torch.tensor([0, V - 1, 17, 1])
    grad_logps = torch.randn(4)
    logps, lse, stats = cpu.logprobs_fwd(logits, labels, return_stats=True)
    entropy_grad = dict(grad_entropy=torch.randn(4), entropy=stats[0])
    grad = cpu.logprobs_bwd(logits, labels, lse, grad_logps, **entropy_grad)
    logps_ref, lse_ref, stats_ref, _ = oracle(logits, labels)
    assert_out_close(logps, logps_ref)
    assert_out_close(lse, lse_ref)
    assert_out_close(stats, stats_ref)
    assert logps[0].item() == pytest.approx(-torch.log(torch.tensor(float(V))).item(), abs=1e-6)
    assert torch.isfinite(grad).all() and (grad[3, ::2] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nan_row_isolation(dtype, bad):
    """A NaN (or +inf) logit makes its row NaN in every output and gradient; others stay exact."""
    N, V = 6, 3000
    logits, labels = make_inputs(N, V, dtype, p_ignore=0.0)
    logits[2, 2500] = float(bad)
    grad_logps = torch.randn(N)
    logps, lse, stats = cpu.logprobs_fwd(logits, labels, return_stats=True)
    grad = cpu.logprobs_bwd(logits, labels, lse, grad_logps)
    ok = torch.arange(N) != 2
    logps_ref, _, stats_ref, grad_ref = oracle(logits[ok], labels[ok], grad_logps=grad_logps[ok])
    assert logps[2].isnan() and lse[2].isnan()
    assert stats[:, 2].isnan().all() and grad[2].isnan().all()
    assert_out_close(logps[ok], logps_ref)
    assert_out_close(stats[:, ok], stats_ref)
    assert_grad_close(grad[ok], grad_ref)


def test_out_of_range_label_is_nan():
    logits, _ = make_inputs(4, 50, torch.float32)
    labels = torch.tensor([3, 50, -5, 49])
    logps, lse, _ = cpu.logprobs_fwd(logits, labels)
    grad = cpu.logprobs_bwd(logits, labels, lse, torch.ones(4))
    assert logps[1:3].isnan().all() and not logps[[0, 3]].isnan().any()
    assert grad[1:3].isnan().all() and torch.isfinite(grad[[0, 3]]).all()


def test_many_threads_match_one():
    """Rows are independent: the result does not depend on how they are split over threads."""
    logits, labels = make_inputs(64, 1001, torch.bfloat16)
    threads = torch.get_num_threads()
    outputs = []
    for n in (1, max(2, threads)):
        torch.set_num_threads(n)
        try:
            _, lse, stats = cpu.logprobs_fwd(logits, labels, return_stats=True)
            outputs.append((lse, stats, cpu.logprobs_bwd(logits, labels, lse, torch.ones(64))))
        finally:
            torch.set_num_threads(threads)
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


# The operators: schemas, fake kernels, torch.compile.


def test_operator_schemas():
    ops = torch.ops.dpo_kernels
    assert not ops.logprobs_fwd.default._schema.is_mutable
    assert not ops.logprobs_bwd.default._schema.is_mutable
    arguments = ops.logprobs_bwd_.default._schema.arguments
    mutated = [a.name for a in arguments if a.alias_info and a.alias_info.is_write]
    assert mutated == ["logits"]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_opcheck(dtype):
    """torch.library.opcheck: schema vs behaviour, fake vs real outputs, functionalization."""
    logits, labels = make_inputs(5, 300, dtype)
    _, lse, stats = cpu.logprobs_fwd(logits, labels, return_stats=True)
    bwd_args = (labels, lse, torch.randn(5), torch.randn(5), stats[0].contiguous(), -100, 0.8)
    ops = torch.ops.dpo_kernels
    torch.library.opcheck(ops.logprobs_fwd.default, (logits, labels, -100, 0.8, True))
    torch.library.opcheck(ops.logprobs_fwd.default, (logits, labels, -100, 1.0, False))
    torch.library.opcheck(ops.logprobs_bwd.default, (logits, *bwd_args))
    torch.library.opcheck(ops.logprobs_bwd_.default, (logits.clone(), *bwd_args))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    """The launchers trace into one graph, in-place backward included (functionalized)."""

    def step(logits, labels, grad_logps):
        logps, lse, stats = cpu.logprobs_fwd(logits, labels, return_stats=True)
        entropy_grad = dict(grad_entropy=stats[1], entropy=stats[0])
        grad = cpu.logprobs_bwd(logits, labels, lse, grad_logps, **entropy_grad)
        scratch = logits * 1.0
        cpu.logprobs_bwd(scratch, labels, lse, grad_logps, inplace=True)
        return logps * 2, stats.sum(0), grad, scratch

    torch._dynamo.reset()
    logits, labels = make_inputs(8, 257, torch.float32)
    grad_logps = torch.randn(8)
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    for out, ref in zip(compiled(logits, labels, grad_logps), step(logits, labels, grad_logps)):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


# The fallback.


@pytest.fixture
def failing_build(monkeypatch):
    """A fresh, untried backend whose build raises."""

    def broken_load():
        raise RuntimeError("Error building extension 'dpo_kernels_cpu': simulated")

    monkeypatch.setattr(cpu, "_loaded", None)
    monkeypatch.setattr(cpu, "_load", broken_load)


def _check_fallback_matches_reference():
    logits, labels = make_inputs(6, 100, torch.bfloat16)
    labels[1] = 100  # out of range: NaN, as the native kernels give
    grad_logps, grad_entropy = torch.randn(6), torch.randn(6)
    logps, lse, stats = cpu.logprobs_fwd(logits, labels, return_stats=True, temperature=0.9)
    grad = cpu.logprobs_bwd(
        logits,
        labels,
        lse,
        grad_logps,
        temperature=0.9,
        grad_entropy=grad_entropy,
        entropy=stats[0],
    )
    ok = torch.arange(6) != 1
    logps_ref, lse_ref, stats_ref, grad_ref = oracle(
        logits[ok],
        labels[ok],
        grad_logps=grad_logps[ok],
        grad_entropy=grad_entropy[ok],
        temperature=0.9,
    )
    assert logps[1].isnan() and grad[1].isnan().all()
    assert_out_close(logps[ok], logps_ref)
    scored = labels[ok] != -100
    assert_out_close(lse[ok][scored], lse_ref[scored])
    assert_out_close(stats[:, ok], stats_ref)
    assert_grad_close(grad[ok], grad_ref)
    out = cpu.logprobs_bwd(logits, labels, lse, grad_logps, temperature=0.9, inplace=True)
    assert out is logits


def test_fallback_when_build_fails(failing_build):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpu.available() is False
        assert cpu.available() is False
        _check_fallback_matches_reference()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "simulated" in messages[0] and "falling back" in messages[0]


def test_fallback_when_compile_fails(monkeypatch, tmp_path):
    """A real compile error (a broken source, a scratch build directory) falls back the same way."""
    src = tmp_path / "src"
    src.mkdir()
    for name in cpu._SOURCES:
        (src / name).write_text("this is not C++;\n")
    monkeypatch.setattr(cpu, "_loaded", None)
    monkeypatch.setattr(cpu, "_source_dir", lambda: src)
    monkeypatch.setattr(cpu, "_build_dir", lambda: tmp_path / "build")
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert cpu.available() is False


def test_forced_reference_backend(monkeypatch):
    monkeypatch.setenv("DPO_KERNELS_CPU_BACKEND", "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # forcing the fallback is not worth a warning
        assert cpu.available() is False
        _check_fallback_matches_reference()
