"""Regression tests of the glue between the kernels (issue "Reliability"): each failed before its fix.

The oracle here is written independently of `dpo_kernels.reference`: float64 `torch.log_softmax`, explicit sums
and TRL's sigmoid loss, so that a bug shared by the reference and the code under test cannot hide.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_out_close

import dpo_kernels as dk
from dpo_kernels import checks
from dpo_kernels import losses as L

BACKENDS = ["reference", "cpu", pytest.param("triton", marks=pytest.mark.triton)]
KERNEL_BACKENDS = ["cpu", pytest.param("triton", marks=pytest.mark.triton)]


# --- the oracle ---------------------------------------------------------------------------------------------------


def oracle_token_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    scored = labels != ignore_index
    lp = torch.log_softmax(logits.double(), dim=-1)
    picked = lp.gather(-1, torch.where(scored, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    return torch.where(scored, picked, torch.zeros((), dtype=torch.float64))


def oracle_sums(lp: torch.Tensor, scored: torch.Tensor, ld_alpha: float | None = None):
    """Padded [S, T]: LD-DPO-weighted sums (plain without α) and counts."""
    n = scored.sum(1)
    weight = torch.ones_like(lp)
    if ld_alpha is not None:
        B = lp.shape[0] // 2
        shared = torch.minimum(n[:B], n[B:]).repeat(2)
        weight = torch.where(scored.cumsum(1) <= shared[:, None], 1.0, ld_alpha).double()
    return torch.where(scored, lp.double() * weight, 0.0).sum(1), n


def oracle_sigmoid_loss(pc, pr, rc, rr, beta: float = 0.1) -> torch.Tensor:
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()


def _labels(S: int, T: int, V: int, ignore_index: int, low: int = 0) -> torch.Tensor:
    """Random labels in [low, V) with a prompt and right padding set to ignore_index."""
    labels = torch.randint(low, V, (S, T))
    for r in range(S):
        labels[r, : int(torch.randint(1, 3, ()))] = ignore_index
        labels[r, int(torch.randint(T // 2, T + 1, ())) :] = ignore_index
    return labels


def _hidden_backend(backend: str) -> str:
    """The fused head has no native kernel: "cpu" means its CPU path, as `backend="cpu"` does."""
    return backend


# --- 1. ignore_index = 0 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logps_ignore_index_zero(backend):
    """With ignore_index=0 the mask → stand-in labels step must not read 0 as "scored" (Triton summed nothing)."""
    labels = _labels(4, 9, 50, ignore_index=0, low=1)
    lp = -torch.rand(4, 9) * 5
    out = dk.sequence_logps(lp, labels, ignore_index=0, backend=backend)
    sums, n = oracle_sums(lp, labels != 0)
    assert torch.equal(out.n_tokens, n)
    assert_out_close(out.logps, sums)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpo_loss_from_hidden_ignore_index_zero(backend):
    """From hidden with ignore_index=0: the loss and a non-zero gradient, as the oracle on explicit logits."""
    B, T, H, V = 2, 7, 8, 40
    hidden = torch.randn(2 * B, T, H, requires_grad=True)
    weight = torch.randn(V, H) * 0.5
    labels = _labels(2 * B, T, V, ignore_index=0, low=1)
    rc, rr = torch.randn(B, dtype=torch.float64) - 30, torch.randn(B, dtype=torch.float64) - 30
    out = dk.dpo_loss_from_hidden(hidden, weight, labels, rc, rr, ignore_index=0, backend=backend)
    (grad,) = torch.autograd.grad(out.loss, hidden)

    h64 = hidden.detach().double().requires_grad_()
    sums, _ = oracle_sums(oracle_token_logps(h64 @ weight.double().T, labels, 0), labels != 0)
    expected = oracle_sigmoid_loss(sums[:B], sums[B:], rc, rr)
    (grad_ref,) = torch.autograd.grad(expected, h64)
    assert_out_close(out.loss, expected)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad.double(), grad_ref, atol=1e-5, rtol=1e-4)


# --- 2. ref_logits with LD-DPO and a non-default ignore_index ---------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_ref_logits_ld_alpha_ignore_index(backend):
    B, T, V, alpha = 2, 8, 30, 0.5
    labels = _labels(2 * B, T, V, ignore_index=-1)
    logits, ref_logits = torch.randn(2 * B, T, V), torch.randn(2 * B, T, V)
    out = dk.dpo_loss_from_logits(
        logits, labels, ref_logits=ref_logits, ld_alpha=alpha, ignore_index=-1, backend=backend
    )
    scored = labels != -1
    pol, _ = oracle_sums(oracle_token_logps(logits, labels, -1), scored, alpha)
    ref, _ = oracle_sums(oracle_token_logps(ref_logits, labels, -1), scored, alpha)
    assert_out_close(out.loss, oracle_sigmoid_loss(pol[:B], pol[B:], ref[:B], ref[B:]))


# --- 4. one gradient rule ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry", ["logits", "hidden"])
@pytest.mark.parametrize("ref", ["precomputed", "model"])
def test_gradient_rule(backend, entry, ref):
    """On every backend and entry point: the reference never gets a gradient; a term on `chosen_logps` trains."""
    B, T, H, V = 2, 6, 8, 24
    labels = _labels(2 * B, T, V, ignore_index=-100)
    weight = torch.randn(V, H) * 0.5
    x = torch.randn(2 * B, T, H if entry == "hidden" else V, requires_grad=True)
    ref_x = torch.randn_like(x).requires_grad_()
    rc = (torch.randn(B, dtype=torch.float64) - 20).requires_grad_()
    rr = (torch.randn(B, dtype=torch.float64) - 20).requires_grad_()
    if entry == "logits":
        kw = dict(ref_logits=ref_x) if ref == "model" else {}
        args = (x, labels) if ref == "model" else (x, labels, rc, rr)
        out = dk.dpo_loss_from_logits(*args, **kw, backend=backend)
    else:
        kw = dict(ref_hidden=ref_x) if ref == "model" else {}
        args = (x, weight, labels) if ref == "model" else (x, weight, labels, rc, rr)
        out = dk.dpo_loss_from_hidden(*args, **kw, backend=backend)
    (out.loss - 0.5 * out.chosen_logps.mean()).backward()
    assert rc.grad is None and rr.grad is None and ref_x.grad is None

    x64 = x.detach().double().requires_grad_()
    logits64 = x64 @ weight.double().T if entry == "hidden" else x64
    pol, _ = oracle_sums(oracle_token_logps(logits64, labels, -100), labels != -100)
    if ref == "model":
        ref_logits64 = ref_x.detach().double() @ weight.double().T if entry == "hidden" else ref_x.detach().double()
        ref_sums, _ = oracle_sums(oracle_token_logps(ref_logits64, labels, -100), labels != -100)
        ref_c, ref_r = ref_sums[:B], ref_sums[B:]
    else:
        ref_c, ref_r = rc.detach(), rr.detach()
    total = oracle_sigmoid_loss(pol[:B], pol[B:], ref_c, ref_r) - 0.5 * pol[:B].mean()
    (grad_ref,) = torch.autograd.grad(total, x64)
    torch.testing.assert_close(x.grad.double(), grad_ref, atol=1e-5, rtol=1e-4)


# --- 5, 6. in-place gradients only where they cannot corrupt anything ------------------------------------------------


def _inplace_call(entry: str, logits: torch.Tensor, backend: str):
    labels = torch.randint(0, logits.shape[-1], logits.shape[:-1])
    if entry == "token_logps":
        return dk.token_logps(logits, labels, inplace_grad=True, backend=backend)
    return dk.dpo_loss_from_logits(logits, labels, reference_free=True, inplace_grad=True, backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("entry", ["token_logps", "dpo_loss_from_logits"])
def test_inplace_grad_refuses_a_leaf(backend, entry):
    """A leaf overwritten by its gradient would alias .grad and its storage (an optimizer step reads garbage)."""
    with pytest.raises(ValueError, match="inplace_grad=True would overwrite a leaf tensor"):
        _inplace_call(entry, torch.randn(2, 3, 17, requires_grad=True), backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("entry", ["token_logps", "dpo_loss_from_logits"])
@pytest.mark.parametrize("view", ["slice", "view", "rows"])
def test_inplace_grad_refuses_a_view_of_a_leaf(backend, entry, view):
    """A view of a leaf shares its storage: written over, the leaf would hold its own gradient."""
    leaf = torch.randn(4, 3, 17, requires_grad=True)
    logits = {"slice": leaf[:], "view": leaf.view(2, 6, 17), "rows": leaf[0:2]}[view]
    with pytest.raises(ValueError, match="inplace_grad=True would overwrite a leaf tensor \\(or a view of one\\)"):
        _inplace_call(entry, logits, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("entry", ["token_logps", "dpo_loss_from_logits"])
def test_inplace_grad_refuses_shared_rows(backend, entry):
    """Rows that share memory (expand) would overwrite each other's gradient."""
    row = torch.randn(1, 1, 17, requires_grad=True) * 1  # not a leaf: the overlap is what is refused
    with pytest.raises(ValueError, match="logits whose elements do not share memory"):
        _inplace_call(entry, row.expand(2, 3, 17), backend)


# --- 9, 10. what sequence_logps reads ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logps_ignores_nonfinite_unscored_values(backend):
    """Ignored means ignored: −inf / NaN token log-probs at unscored positions never reach a sum or a gradient."""
    labels = _labels(4, 9, 50, ignore_index=-100)
    lp = -torch.rand(4, 9) * 5
    lp[labels == -100] = float("nan")
    lp[0, 0] = -float("inf")  # position 0 is always a prompt token
    lp.requires_grad_()
    out = dk.sequence_logps(lp, labels, backend=backend)
    out.logps.sum().backward()
    sums, _ = oracle_sums(lp.detach(), labels != -100)
    assert_out_close(out.logps, sums)
    assert torch.equal(lp.grad, (labels != -100).float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logps_integer_mask(backend):
    """TRL's int64 completion_mask passed as labels_or_mask scored every position: refused, with the fix named."""
    lp = -torch.rand(4, 9)
    mask = (torch.rand(4, 9) > 0.3).long()
    with pytest.raises(ValueError, match="Pass a mask as bool"):
        dk.sequence_logps(lp, mask, backend=backend)
    out = dk.sequence_logps(lp, mask.bool(), backend=backend)
    sums, n = oracle_sums(lp, mask.bool())
    assert torch.equal(out.n_tokens, n)
    assert_out_close(out.logps, sums)


# --- 14. one answer on every backend ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_reference_logps_refused(backend):
    logits, labels = torch.randn(4, 5, 11), _labels(4, 5, 11, -100)
    with pytest.raises(TypeError, match="ref_chosen_logps must be a floating-point tensor"):
        dk.dpo_loss_from_logits(logits, labels, torch.zeros(2, dtype=torch.long), torch.zeros(2), backend=backend)
    with pytest.raises(TypeError, match="ref_chosen_logps must be a floating-point tensor"):
        dk.dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2, dtype=torch.long), torch.zeros(2), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_dtypes(backend):
    """fp32 logits with float64 references: fp32 outputs (the references used unrounded); float64 logits: float64;
    dpo_loss: the promoted dtype of its inputs."""
    B, T, V = 2, 6, 19
    logits, labels = torch.randn(2 * B, T, V), _labels(2 * B, T, V, -100)
    rc = torch.randn(B, dtype=torch.float64) - 20
    rr = torch.randn(B, dtype=torch.float64) - 20
    out = dk.dpo_loss_from_logits(logits, labels, rc, rr, return_stats=True, backend=backend)
    fields = [out.loss, out.losses, out.chosen_rewards, out.chosen_logps, *out.metrics.values()]
    assert {t.dtype for t in fields} == {torch.float32}
    sums, _ = oracle_sums(oracle_token_logps(logits, labels, -100), labels != -100)
    assert_out_close(out.loss, oracle_sigmoid_loss(sums[:B], sums[B:], rc, rr))
    out64 = dk.dpo_loss_from_logits(logits.double(), labels, rc, rr, return_stats=True, backend=backend)
    assert {t.dtype for t in (out64.loss, out64.losses, *out64.metrics.values())} == {torch.float64}
    pc, pr = torch.randn(B) - 20, torch.randn(B) - 20
    assert dk.dpo_loss(pc, pr, rc.float(), rr.float(), backend=backend).loss.dtype == torch.float32
    assert dk.dpo_loss(pc, pr, rc, rr, backend=backend).loss.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dpo_loss_half_inputs(backend, dtype):
    """All-bf16 / all-fp16 log-probs: fp32 math and outputs on every backend (bf16 rounded the margin away, fp16
    sppo_hard overflowed to inf on the reference)."""
    pc, pr = torch.tensor([-301.0, -12.5]), torch.tensor([-305.0, -11.0])
    rc, rr = torch.tensor([-299.0, -13.0]), torch.tensor([-300.0, -12.0])
    for loss_type in ("sigmoid", "sppo_hard"):
        out = dk.dpo_loss(*(t.to(dtype) for t in (pc, pr, rc, rr)), loss_type=loss_type, backend=backend)
        assert out.loss.dtype == torch.float32
        x = [t.to(dtype).double() for t in (pc, pr, rc, rr)]
        xc, xr = x[0] - x[2], x[1] - x[3]
        if loss_type == "sigmoid":
            expected = -F.logsigmoid(0.1 * (xc - xr)).mean()
        else:
            expected = ((xc - 5.0) ** 2 + (xr + 5.0) ** 2).mean()
        assert_out_close(out.loss, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry", ["dpo_loss", "dpo_loss_from_logits", "dpo_loss_from_hidden"])
def test_only_loss_and_policy_logps_differentiable(backend, entry):
    """One rule: per-pair losses, rewards and metrics are detached on every backend (on Triton they reported
    requires_grad and back-propagated zeros)."""
    B, T, H, V = 2, 5, 8, 19
    labels = _labels(2 * B, T, V, -100)
    rc, rr = torch.randn(B) - 20, torch.randn(B) - 20
    if entry == "dpo_loss":
        pc = (torch.randn(B) - 20).requires_grad_()
        out = dk.dpo_loss(pc, torch.randn(B) - 20, rc, rr, backend=backend)
    elif entry == "dpo_loss_from_logits":
        out = dk.dpo_loss_from_logits(torch.randn(2 * B, T, V, requires_grad=True), labels, rc, rr, backend=backend)
    else:
        hidden = torch.randn(2 * B, T, H, requires_grad=True)
        out = dk.dpo_loss_from_hidden(hidden, torch.randn(V, H), labels, rc, rr, backend=backend)
    assert out.loss.requires_grad and out.chosen_logps.requires_grad
    details = [out.losses, out.chosen_rewards, out.rejected_rewards, *out.metrics.values()]
    assert not any(t.requires_grad for t in details)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry", ["dpo_loss_from_logits", "dpo_loss_from_hidden"])
def test_labels_of_zeros_and_ones_are_labels(backend, entry):
    """Labels whose ids are all 0 or 1 with no ignored position are labels, not a 0/1 mask (they were refused)."""
    B, T, H, V = 2, 4, 8, 5
    labels = torch.randint(0, 2, (2 * B, T))
    rc, rr = torch.full((B,), -5.0), torch.full((B,), -6.0)
    x = torch.randn(2 * B, T, H if entry == "dpo_loss_from_hidden" else V)
    weight = torch.randn(V, H)
    if entry == "dpo_loss_from_logits":
        out = dk.dpo_loss_from_logits(x, labels, rc, rr, backend=backend)
        logits = x
    else:
        out = dk.dpo_loss_from_hidden(x, weight, labels, rc, rr, backend=backend)
        logits = x.double() @ weight.double().T
    sums, _ = oracle_sums(oracle_token_logps(logits, labels, -100), labels != -100)
    assert_out_close(out.loss, oracle_sigmoid_loss(sums[:B], sums[B:], rc.double(), rr.double()), atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_mix_term_limit(backend):
    """At most 15 terms on every backend (the kernel packs the codes into one constexpr)."""
    names = ["sigmoid"] * (L.MAX_LOSS_TERMS + 1)
    with pytest.raises(ValueError, match=f"a loss mix has at most {L.MAX_LOSS_TERMS} terms, got 16"):
        dk.dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), loss_type=names, backend=backend)
    mix = dk.dpo_loss(
        torch.zeros(2), torch.ones(2), torch.zeros(2), torch.zeros(2), loss_type=names[:-1], backend=backend
    )
    assert_out_close(mix.loss, L.MAX_LOSS_TERMS * F.softplus(torch.tensor(0.1, dtype=torch.float64)))


def test_loss_codes_fit_their_field():
    """The kernel's code field is sized from the registry: every code survives packing next to every other."""
    from dpo_kernels.ops.dpo import CODE_BITS, MAX_TERMS

    assert len(L.LOSS_TYPES) <= 1 << CODE_BITS and MAX_TERMS == L.MAX_LOSS_TERMS
    codes = [k % len(L.LOSS_TYPES) for k in range(len(L.LOSS_TYPES) - 1, -1, -1)][:MAX_TERMS]
    packed = sum(code << (CODE_BITS * k) for k, code in enumerate(codes))
    assert packed < 1 << 63
    assert [(packed >> (CODE_BITS * k)) & ((1 << CODE_BITS) - 1) for k in range(len(codes))] == codes


# --- margins that keep their precision ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend, V",
    [
        ("reference", 151936),
        ("cpu", 151936),
        # the interpreter needs 5 minutes at V = 151936; the sums and margins under test do not depend on V
        pytest.param("triton", 8192, marks=pytest.mark.triton),
    ],
)
def test_margins_keep_their_precision(backend, V):
    """2 pairs × 512 tokens at V = 151936 (Qwen2), fp32 logits, TRL's β: the loss within 1e-6 of the float64 value
    of the same logits. With fp32 sequence sums (≈ −6000 nats, spacing 5e-4) it missed by up to 5e-5."""
    gen = torch.Generator().manual_seed(1234)
    B, T = 2, 512
    labels = torch.randint(0, V, (2 * B, T), generator=gen)
    labels[:, :8] = -100
    logits = torch.randn(2 * B, T, V, generator=gen)
    # the float64 value of the same logits, a row block at a time
    sums = torch.zeros(2 * B, dtype=torch.float64)
    for r in range(2 * B):
        sums[r] = oracle_token_logps(logits[r], labels[r], -100).sum()
    rc = sums[:B] + torch.randn(B, generator=gen, dtype=torch.float64) * 5
    rr = sums[B:] + torch.randn(B, generator=gen, dtype=torch.float64) * 5
    expected = oracle_sigmoid_loss(sums[:B], sums[B:], rc, rr, beta=0.1)
    out = dk.dpo_loss_from_logits(logits, labels, rc, rr, beta=0.1, backend=backend)
    assert abs(out.loss.double() - expected).item() <= 1e-6


# --- 13 and the host syncs: every public function compiles into one graph -----------------------------------------


def _packed_case(B: int = 2, H: int = 8, V: int = 21):
    lengths = torch.tensor([5, 3, 6, 4])[: 2 * B]
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    N = int(cu[-1])
    labels = torch.randint(0, V, (N,))
    labels[cu[:-1]] = -100  # each sequence's first token is a prompt token
    return cu, labels, torch.randn(N, V), torch.randn(N, H), torch.randn(V, H) * 0.5


def _call(fn: str, layout: str, backend: str, x: torch.Tensor, labels, cu, weight):
    """One public function's differentiable output (a scalar) for input x (logits or hidden)."""
    packed = dict(cu_seqlens=cu) if layout == "packed" else {}
    B = (cu.numel() - 1 if layout == "packed" else labels.shape[0]) // 2
    rc = rr = torch.full((B,), -30.0, dtype=torch.float64)
    if fn == "token_logps":
        lp, stats = dk.token_logps(x, labels, return_stats=True, backend=backend)
        return lp.sum() + stats.entropy.sum()
    if fn == "sequence_logps":
        lp = dk.token_logps(x, labels, backend=backend)
        return dk.sequence_logps(lp, labels, ld_alpha=0.5, **packed, backend=backend).logps.sum()
    if fn == "dpo_loss":
        lp = dk.token_logps(x, labels, backend=backend)
        seq = dk.sequence_logps(lp, labels, **packed, backend=backend).logps
        return dk.dpo_loss(seq[:B], seq[B:], rc, rr, loss_type=["sigmoid", "aot"], backend=backend).loss
    if fn == "dpo_loss_from_logits":
        out = dk.dpo_loss_from_logits(
            x, labels, rc, rr, **packed, use_weighting=True, return_stats=True, backend=backend
        )
        return out.loss + out.chosen_logps.sum() * 1e-3
    if fn == "linear_token_logps":
        return dk.linear_token_logps(x, weight, labels, backend=backend).sum()
    out = dk.dpo_loss_from_hidden(x, weight, labels, rc, rr, **packed, ld_alpha=0.5, return_stats=True, backend=backend)
    return out.loss


PUBLIC_CASES = [
    ("token_logps", "padded"),
    ("sequence_logps", "padded"),
    ("sequence_logps", "packed"),
    ("dpo_loss", "padded"),
    ("dpo_loss", "packed"),
    ("dpo_loss_from_logits", "padded"),
    ("dpo_loss_from_logits", "packed"),
    ("linear_token_logps", "padded"),
    ("dpo_loss_from_hidden", "padded"),
    ("dpo_loss_from_hidden", "packed"),
]


def _inputs(fn: str, layout: str):
    cu, packed_labels, packed_logits, packed_hidden, weight = _packed_case()
    hidden_fn = fn in ("linear_token_logps", "dpo_loss_from_hidden")
    if layout == "packed":
        return (packed_hidden if hidden_fn else packed_logits), packed_labels, cu, weight
    labels = _labels(4, 6, weight.shape[0], -100)
    x = torch.randn(4, 6, weight.shape[1]) if hidden_fn else torch.randn(4, 6, weight.shape[0])
    return x, labels, cu, weight


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn, layout", PUBLIC_CASES)
def test_public_functions_compile_fullgraph(backend, fn, layout):
    """torch.compile(fullgraph=True) of every public function, padded and packed: a host read of a tensor (a
    device sync on a GPU) would break the graph and fail here. Same values and gradients as eager."""
    torch._dynamo.reset()
    x, labels, cu, weight = _inputs(fn, layout)
    step = lambda x: _call(fn, layout, backend, x, labels, cu, weight)  # noqa: E731
    x_compiled, x_eager = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(x_compiled)
    out_eager = step(x_eager)
    out.backward()
    out_eager.backward()
    torch.testing.assert_close(out, out_eager, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, atol=1e-6, rtol=1e-6)


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts tensor → Python reads (`.item()`, `bool(t)`, `.tolist()`): on a GPU each is a device sync."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn, layout", PUBLIC_CASES)
def test_no_host_read_off_the_cpu(backend, fn, layout, monkeypatch):
    """With the value checks that only CPU tensors get turned off (as for CUDA tensors), a call and its backward
    read nothing back to the host."""
    monkeypatch.setattr(checks, "_host_checks", lambda t: False)
    x, labels, cu, weight = _inputs(fn, layout)
    x.requires_grad_()
    dk.token_logps(x[..., :1], torch.zeros(x.shape[:-1], dtype=torch.long))  # builds the native backend first
    with _HostReads() as mode:
        _call(fn, layout, backend, x, labels, cu, weight).backward()
    assert mode.reads == []
