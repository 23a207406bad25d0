"""The public API: every backend against the float64 reference, end to end from logits; bad input → clear errors.

The kernels' own value and gradient tests are in test_logprobs.py, test_segments.py, test_dpo.py and test_cpu.py;
here the pieces are checked together, through `dpo_kernels.*`, on every backend this machine can run.
"""

import pytest
import torch
from conftest import assert_grad_close, assert_out_close

import dpo_kernels as dk
from dpo_kernels import checks
from dpo_kernels import losses as L
from dpo_kernels import reference as R

BACKENDS = [
    "reference",
    # the native CPU backend is built on first use (csrc/); a machine without a compiler fails these loudly
    "cpu",
    pytest.param("triton", marks=pytest.mark.triton),
]


def _loss_options(loss_type: str) -> dict:
    """Options that make a loss type valid (exo_pair and robust need a label smoothing)."""
    return {"loss_type": loss_type, "label_smoothing": 0.2 if loss_type in ("exo_pair", "robust") else 0.0}


def _batch(B: int, T: int, V: int, dtype: torch.dtype, device: str = "cpu"):
    """Padded rows (chosen then rejected), a prompt of 1–3 tokens, right padding, and reference log-probs."""
    logits = (torch.randn(2 * B, T, V, device=device) * 2).to(dtype)
    labels = torch.randint(0, V, (2 * B, T), device=device)
    for r in range(2 * B):
        prompt, end = int(torch.randint(1, 4, ())), int(torch.randint(T // 2, T + 1, ()))
        labels[r, :prompt] = -100
        labels[r, end:] = -100
    ref = torch.randn(2, B, device=device, dtype=torch.float64) * 5 - 20
    return logits, labels, ref[0], ref[1]


def _packed(logits: torch.Tensor, labels: torch.Tensor):
    """The same sequences packed: each row keeps its tokens up to its last scored one."""
    lengths = [int(torch.nonzero(row != -100).max()) + 1 for row in labels]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    packed_logits = torch.cat([logits[r, :n] for r, n in enumerate(lengths)])
    packed_labels = torch.cat([labels[r, :n] for r, n in enumerate(lengths)])
    return packed_logits, packed_labels, cu


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", L.LOSS_TYPES)
def test_dpo_loss_from_logits_every_loss_type(backend, loss_type):
    B, T, V = 3, 9, 37
    logits, labels, rc, rr = _batch(B, T, V, torch.float32)
    options = _loss_options(loss_type)
    x = logits.clone().requires_grad_()
    out = dk.dpo_loss_from_logits(x, labels, rc.float(), rr.float(), backend=backend, **options)
    (grad,) = torch.autograd.grad(out.loss, x)

    x_ref = logits.double().requires_grad_()
    out_ref = R.dpo_loss_from_logits(x_ref, labels, rc, rr, **options)
    (grad_ref,) = torch.autograd.grad(out_ref.loss, x_ref)

    assert_out_close(out.loss, out_ref.loss)
    assert_out_close(out.losses, out_ref.losses)
    assert_out_close(out.chosen_rewards, out_ref.chosen_rewards)
    assert_out_close(out.rejected_logps, out_ref.rejected_logps)
    assert out.metrics.keys() == out_ref.metrics.keys() == set(L.REWARD_METRICS)
    for key in out.metrics:
        assert_out_close(out.metrics[key], out_ref.metrics[key])
    assert_grad_close(grad, grad_ref)


MIXES = [
    pytest.param({"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}, id="mpo"),
    pytest.param({"loss_type": ["ipo", "sigmoid_norm"], "f_divergence_type": "js_divergence"}, id="ipo-js"),
    pytest.param(
        {"loss_type": "sigmoid", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
        id="alpha",
    ),
    pytest.param({"loss_type": ["aot", "aot_unpaired"], "label_smoothing": 0.1}, id="aot"),
]


EXTRAS = [
    pytest.param({}, id="plain"),
    pytest.param({"ld_alpha": 0.5, "return_stats": True}, id="ld-stats"),
    pytest.param({"use_weighting": True}, id="wpo"),
]
# WPO with aot is refused by design (test_bad_input_from_logits), so that pair is not generated.
OPTION_CASES = [
    pytest.param(mix.values[0], extra.values[0], id=f"{mix.id}-{extra.id}")
    for mix in MIXES
    for extra in EXTRAS
    if not (mix.id == "aot" and extra.id == "wpo")
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options, extra", OPTION_CASES)
def test_dpo_loss_from_logits_options(backend, options, extra, dtype=torch.bfloat16):
    B, T, V = 2, 11, 50
    logits, labels, _, _ = _batch(B, T, V, dtype)
    # A reference near the policy, as in training: log-ratios of order 1. (Far apart, the alpha divergence's
    # exp((a − 1)·x) turns the fp32 rounding of the summed log-probs into a 1e-5 relative error of a 1e6 loss.)
    policy = R.sequence_logps(R.token_logps(logits.double(), labels), labels, ld_alpha=extra.get("ld_alpha")).logps
    rc, rr = (policy + torch.randn_like(policy)).chunk(2)
    x = logits.clone().requires_grad_()
    out = dk.dpo_loss_from_logits(x, labels, rc.float(), rr.float(), backend=backend, **options, **extra)
    (grad,) = torch.autograd.grad(out.loss, x)
    x_ref = logits.double().requires_grad_()
    out_ref = R.dpo_loss_from_logits(x_ref, labels, rc, rr, **options, **extra)
    (grad_ref,) = torch.autograd.grad(out_ref.loss, x_ref)

    assert_out_close(out.loss, out_ref.loss)
    assert_out_close(out.chosen_logps, out_ref.chosen_logps)
    assert out.metrics.keys() == out_ref.metrics.keys()
    for key in out.metrics:
        assert_out_close(out.metrics[key], out_ref.metrics[key])
    assert_grad_close(grad, grad_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_padded(backend):
    B, T, V = 3, 10, 29
    logits, labels, rc, rr = _batch(B, T, V, torch.float32)
    packed_logits, packed_labels, cu = _packed(logits, labels)
    options = {"loss_type": ["sigmoid", "ipo", "sft"], "ld_alpha": 0.4, "return_stats": True}

    x = logits.clone().requires_grad_()
    padded = dk.dpo_loss_from_logits(x, labels, rc.float(), rr.float(), backend=backend, **options)
    padded.loss.backward()
    xp = packed_logits.clone().requires_grad_()
    packed = dk.dpo_loss_from_logits(
        xp, packed_labels, rc.float(), rr.float(), cu_seqlens=cu, backend=backend, **options
    )
    packed.loss.backward()

    assert_out_close(packed.loss, padded.loss)
    assert_out_close(packed.chosen_logps, padded.chosen_logps)
    for key in padded.metrics:
        assert_out_close(packed.metrics[key], padded.metrics[key])
    assert_out_close(xp.grad, _packed(x.grad, labels)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_from_logits_equals_precomputed(backend):
    B, T, V = 2, 8, 31
    logits, labels, _, _ = _batch(B, T, V, torch.float32)
    ref_logits = logits + torch.randn_like(logits)
    ref_seq = R.sequence_logps(R.token_logps(ref_logits, labels), labels, ld_alpha=0.7)
    rc, rr = ref_seq.logps[:B], ref_seq.logps[B:]

    from_logits = dk.dpo_loss_from_logits(logits, labels, ref_logits=ref_logits, ld_alpha=0.7, backend=backend)
    precomputed = dk.dpo_loss_from_logits(logits, labels, rc, rr, ld_alpha=0.7, backend=backend)
    free = dk.dpo_loss_from_logits(logits, labels, reference_free=True, backend=backend)
    zeros = dk.dpo_loss_from_logits(logits, labels, torch.zeros(B), torch.zeros(B), backend=backend)
    assert_out_close(from_logits.loss, precomputed.loss)
    assert_out_close(free.loss, zeros.loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpo_loss_gradients(backend):
    """dk.dpo_loss on per-sequence log-probs: gradients to the four inputs and the separate sft sum."""
    B = 5
    pc, pr, rc, rr, sft_sum = (torch.randn(B, dtype=torch.float64) * 20 for _ in range(5))
    count = torch.randint(1, 30, (B,))
    options = {"loss_type": ["sigmoid", "sft", "aot"], "loss_weights": [1.0, 0.5, 0.3], "beta": 0.2}
    extra = {"chosen_token_logp_sum": sft_sum, "chosen_token_count": count}

    inputs = [t.float().requires_grad_() for t in (pc, pr, rc, rr, sft_sum)]
    out = dk.dpo_loss(*inputs[:4], **options, **{**extra, "chosen_token_logp_sum": inputs[4]}, backend=backend)
    grads = torch.autograd.grad(out.loss, inputs)
    inputs_ref = [t.clone().requires_grad_() for t in (pc, pr, rc, rr, sft_sum)]
    out_ref = R.dpo_loss(*inputs_ref[:4], **options, **{**extra, "chosen_token_logp_sum": inputs_ref[4]})
    grads_ref = torch.autograd.grad(out_ref.loss, inputs_ref)
    assert_out_close(out.loss, out_ref.loss)
    for g, g_ref in zip(grads, grads_ref):
        assert_grad_close(g, g_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logps_no_grad_and_stats(backend):
    logits = torch.randn(3, 7, 41)
    labels = torch.randint(0, 41, (3, 7))
    labels[0, :3] = -100
    with torch.no_grad():
        lp, stats = dk.token_logps(logits, labels, return_stats=True, backend=backend)
    lp_ref, stats_ref = R.token_logps(logits.double(), labels, return_stats=True)
    assert lp.dtype == torch.float32 and lp.shape == labels.shape
    assert_out_close(lp, lp_ref)
    for name in ("entropy", "mean_logit", "log_sum_sq_probs"):
        assert_out_close(getattr(stats, name), getattr(stats_ref, name))
    assert torch.equal(stats.is_top1, stats_ref.is_top1)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_inplace_grad_writes_into_logits(backend):
    logits = torch.randn(2, 6, 33, dtype=torch.bfloat16)
    labels = torch.randint(0, 33, (2, 6))
    x = logits.clone().requires_grad_()
    expected = torch.autograd.grad(dk.dpo_loss_from_logits(x, labels, reference_free=True, backend=backend).loss, x)[0]
    y = logits.clone().requires_grad_() * 1  # a non-leaf: in place on a leaf is refused
    out = dk.dpo_loss_from_logits(y, labels, reference_free=True, inplace_grad=True, backend=backend)
    (grad,) = torch.autograd.grad(out.loss, y)
    assert grad.data_ptr() == y.data_ptr()
    torch.testing.assert_close(grad, expected, atol=0, rtol=0)


def test_dpo_loss_module():
    logits, labels, rc, rr = _batch(2, 6, 17, torch.float32)
    crit = dk.DPOLoss(beta=0.3, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    out = crit(logits, labels, rc.float(), rr.float())
    expected = dk.dpo_loss_from_logits(
        logits, labels, rc.float(), rr.float(), beta=0.3, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]
    )
    assert_out_close(out.loss, expected.loss)
    assert "beta=0.3" in repr(crit)


def test_default_backend_choice():
    import os

    from dpo_kernels.dispatch import pick as _pick_backend

    expected = "triton" if os.environ.get("TRITON_INTERPRET") == "1" else "cpu"
    assert _pick_backend(torch.zeros(1), None) == expected
    assert _pick_backend(torch.zeros(1), "reference") == "reference"


# --- bad input: each case names the argument -----------------------------------------------------------------


def _logits_case():
    logits, labels, rc, rr = _batch(2, 5, 13, torch.float32)
    return logits, labels, rc.float(), rr.float()


def _call_from_logits(change: dict):
    logits, labels, rc, rr = _logits_case()
    args = {"logits": logits, "labels": labels, "ref_chosen_logps": rc, "ref_rejected_logps": rr, **change}
    backend = args.pop("backend", None)
    return dk.dpo_loss_from_logits(**args, backend=backend)


BAD_FROM_LOGITS = [
    ({"loss_type": "dpo"}, ValueError, "unknown loss_type 'dpo'; valid loss types: sigmoid, hinge"),
    ({"f_divergence_type": "kl"}, ValueError, "unknown f_divergence_type 'kl'"),
    ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, ValueError, "loss_weights has 1 entries"),
    ({"loss_type": "exo_pair"}, ValueError, "'exo_pair' needs label_smoothing in \\(0, 1\\)"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, ValueError, "'robust' needs label_smoothing in \\[0, 0.5\\)"),
    ({"beta": 0.0}, ValueError, "beta must be a finite number > 0"),
    ({"ld_alpha": 1.5}, ValueError, "ld_alpha must be in \\[0, 1\\]"),
    ({"loss_type": "aot", "use_weighting": True}, ValueError, "not supported with 'aot'"),
    (
        {"loss_type": "bco_pair", "f_divergence_type": "forward_kl"},
        ValueError,
        "f_divergence_type 'forward_kl' is not supported with loss_type 'bco_pair'",
    ),
    ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
    ({"temperature": 5e-39}, ValueError, "temperature must exceed 5.88e-39 \\(2 / T must be finite in fp32\\)"),
    ({"labels": torch.zeros(4, 5)}, TypeError, "labels must be an integer tensor"),
    ({"labels": torch.full((4, 5), 13)}, ValueError, "labels must be in \\[0, 13\\) or equal ignore_index"),
    ({"labels": torch.zeros(4, 6, dtype=torch.long)}, ValueError, "labels shape \\(4, 6\\) must equal logits shape"),
    ({"logits": torch.randn(3, 5, 13), "labels": torch.zeros(3, 5, dtype=torch.long)}, ValueError, "even"),
    ({"ref_chosen_logps": None}, ValueError, "pass both ref_chosen_logps and ref_rejected_logps, or neither"),
    (
        {"ref_chosen_logps": None, "ref_rejected_logps": None},
        ValueError,
        "give the reference exactly one way",
    ),
    ({"ref_logits": torch.randn(4, 5, 13)}, ValueError, "give the reference exactly one way"),
    ({"ref_chosen_logps": torch.zeros(3)}, ValueError, "ref_chosen_logps must have shape \\[2\\]|one shape"),
    ({"inplace_grad": True}, ValueError, "inplace_grad=True needs logits that require grad"),
    ({"cu_seqlens": torch.tensor([0, 5, 10, 15, 20])}, ValueError, "packed logits \\(with cu_seqlens\\) must be"),
    ({"backend": "cuda"}, ValueError, "unknown backend 'cuda'"),
    ({"gamma": 1.0}, TypeError, "gamma"),
]


@pytest.mark.parametrize("change, error, message", BAD_FROM_LOGITS, ids=[m[:40] for _, _, m in BAD_FROM_LOGITS])
def test_bad_input_from_logits(change, error, message):
    with pytest.raises(error, match=message):
        _call_from_logits(change)


def _packed_case(cu):
    logits = torch.randn(12, 9)
    labels = torch.randint(0, 9, (12,))
    return dk.dpo_loss_from_logits(logits, labels, reference_free=True, cu_seqlens=cu)


@pytest.mark.parametrize(
    "cu, error, message",
    [
        (torch.tensor([0, 5, 3, 12]), ValueError, "cu_seqlens must be non-decreasing"),
        (torch.tensor([0, 3, 6, 9, 11]), ValueError, "cu_seqlens must end at the number of tokens N = 12"),
        (torch.tensor([1, 3, 6, 9, 12]), ValueError, "cu_seqlens must start at 0"),
        (torch.tensor([0.0, 3, 6, 9, 12]), TypeError, "cu_seqlens must be an int32 or int64 tensor"),
        (torch.tensor([0, 3, 6, 12]), ValueError, "even"),
    ],
)
def test_bad_cu_seqlens(cu, error, message):
    with pytest.raises(error, match=message):
        _packed_case(cu)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"pr": torch.zeros(3)}, ValueError, "one shape"),
        ({"rc": torch.zeros(2, dtype=torch.long)}, TypeError, "ref_chosen_logps must be a floating-point tensor"),
        ({"rr": torch.zeros(2, 1)}, ValueError, "ref_rejected_logps must be 1-D"),
        ({"loss_type": "ipo"}, ValueError, "needs chosen_lengths and rejected_lengths"),
        ({"loss_type": "sft"}, ValueError, "'sft' needs chosen_token_count"),
        ({"wpo_weights": torch.ones(3)}, ValueError, "wpo_weights must have shape \\[4\\]"),
        ({"wpo_weights": torch.ones(4), "loss_type": "aot_unpaired"}, ValueError, "not supported with 'aot'"),
    ],
)
def test_bad_input_dpo_loss(backend, change, error, message):
    args = {"pc": torch.zeros(2), "pr": torch.zeros(2), "rc": torch.zeros(2), "rr": torch.zeros(2), **change}
    tensors = [args.pop(k) for k in ("pc", "pr", "rc", "rr")]
    with pytest.raises(error, match=message):
        dk.dpo_loss(*tensors, **args, backend=backend)


# --- the fused lm_head entry point ------------------------------------------------------------------------------

HIDDEN_BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.triton)]


@pytest.mark.parametrize("backend", HIDDEN_BACKENDS)
@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="sigmoid"),
        pytest.param(
            {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "ld_alpha": 0.5, "return_stats": True},
            id="sft-ld-stats",
        ),
        pytest.param({"loss_type": "ipo", "use_weighting": True}, id="ipo-wpo"),
    ],
)
def test_dpo_loss_from_hidden(backend, options):
    """Against the float64 logits built explicitly: softcap(hidden @ weightᵀ + bias), then the reference."""
    B, T, Hdim, V, softcap = 2, 7, 16, 45, 3.0
    _, labels, rc, rr = _batch(B, T, V, torch.float32)
    hidden, weight, bias = torch.randn(2 * B, T, Hdim), torch.randn(V, Hdim) * 0.5, torch.randn(V)
    inputs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = dk.dpo_loss_from_hidden(
        inputs[0],
        inputs[1],
        labels,
        rc.float(),
        rr.float(),
        bias=inputs[2],
        softcap=softcap,
        backend=backend,
        **options,
    )
    grads = torch.autograd.grad(out.loss, inputs)

    inputs_ref = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    logits = softcap * torch.tanh((inputs_ref[0] @ inputs_ref[1].T + inputs_ref[2]) / softcap)
    out_ref = R.dpo_loss_from_logits(logits, labels, rc, rr, **options)
    grads_ref = torch.autograd.grad(out_ref.loss, inputs_ref)

    assert_out_close(out.loss, out_ref.loss)
    assert out.metrics.keys() == out_ref.metrics.keys()
    for key in out.metrics:
        assert_out_close(out.metrics[key], out_ref.metrics[key])
    for g, g_ref in zip(grads, grads_ref):
        assert_out_close(g, g_ref)  # fp32 gradients out of short GEMMs (K ≤ 45): within the fp32 output tolerance


@pytest.mark.parametrize("backend", HIDDEN_BACKENDS)
def test_dpo_loss_from_hidden_reference_model(backend):
    B, T, Hdim, V = 2, 6, 8, 30
    _, labels, _, _ = _batch(B, T, V, torch.float32)
    hidden, ref_hidden, weight = torch.randn(2 * B, T, Hdim), torch.randn(2 * B, T, Hdim), torch.randn(V, Hdim)
    ref_seq = R.sequence_logps(R.token_logps(ref_hidden.double() @ weight.double().T, labels), labels)
    rc, rr = ref_seq.logps[:B], ref_seq.logps[B:]
    from_hidden = dk.dpo_loss_from_hidden(hidden, weight, labels, ref_hidden=ref_hidden, backend=backend)
    precomputed = dk.dpo_loss_from_hidden(hidden, weight, labels, rc.float(), rr.float(), backend=backend)
    assert_out_close(from_hidden.loss, precomputed.loss)


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"hidden": torch.randn(4, 5, 7)}, ValueError, "hidden must have shape \\[..., H\\] with H = 8"),
        ({"weight": torch.randn(13)}, ValueError, "weight must have shape \\[V, H\\]"),
        ({"bias": torch.randn(12)}, ValueError, "bias must be a \\[13\\] tensor"),
        ({"softcap": -1.0}, ValueError, "softcap must be None or a finite number > 0"),
        ({"hidden": torch.randn(4, 5, 8).long()}, TypeError, "hidden must be a floating-point tensor"),
        ({"labels": torch.full((4, 5), 13)}, ValueError, "labels must be in \\[0, 13\\)"),
    ],
)
def test_bad_input_from_hidden(change, error, message):
    args = {"hidden": torch.randn(4, 5, 8), "weight": torch.randn(13, 8), "labels": torch.randint(0, 13, (4, 5))}
    args.update(change)
    with pytest.raises(error, match=message):
        dk.dpo_loss_from_hidden(args.pop("hidden"), args.pop("weight"), args.pop("labels"), reference_free=True, **args)


# --- torch.compile and the in-place backward --------------------------------------------------------------------

KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_token_logps_compiles_fullgraph(backend):
    """The kernels are torch custom ops: a compiled graph keeps them (no graph break) and gives eager's numbers."""
    torch._dynamo.reset()
    logits = torch.randn(2, 5, 33)
    labels = torch.randint(0, 33, (2, 5))
    labels[0, :2] = -100
    g_lp, g_ent = torch.randn(2, 5), torch.randn(2, 5)

    def step(x):
        lp, stats = dk.token_logps(x, labels, return_stats=True, backend=backend)
        return (lp * g_lp).sum() + (stats.entropy * g_ent).sum()

    x, x_eager = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(torch.compile(step, fullgraph=True)(x), x)
    (grad_eager,) = torch.autograd.grad(step(x_eager), x_eager)
    torch.testing.assert_close(grad, grad_eager, atol=0, rtol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("entry", ["token_logps", "dpo_loss_from_logits"])
def test_inplace_grad_refuses_a_later_reader(backend, entry):
    """tanh saves its output; overwriting it with the gradient must raise, not give tanh a wrong input."""
    x = torch.randn(2, 4, 33, requires_grad=True)
    labels = torch.randint(0, 33, (2, 4))
    z = torch.tanh(x)
    if entry == "token_logps":
        loss = dk.token_logps(z, labels, inplace_grad=True, backend=backend).sum()
    else:
        loss = dk.dpo_loss_from_logits(z, labels, reference_free=True, inplace_grad=True, backend=backend).loss
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# --- shifted logits without a copy ---------------------------------------------------------------------------------


class _BigOutputs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops whose outputs hold at least `numel` elements (a copy of the logits would)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if any(isinstance(t, torch.Tensor) and t.numel() >= self.numel for t in outs):
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("entry", ["token_logps", "dpo_loss_from_logits"])
def test_shifted_logits_read_in_place(backend, entry):
    """logits[:, :-1] (rows not evenly strided) is read where it lies: the forward allocates nothing logits-sized,
    and values and gradients equal the contiguous copy's bit for bit."""
    logits, labels, rc, rr = _batch(2, 7, 37, torch.bfloat16)
    base = torch.cat([logits, logits[:, :1]], dim=1)  # [2B, T + 1, V]: the model's logits
    shifted = base[:, :-1]

    def run(x):
        if entry == "token_logps":
            return dk.token_logps(x, labels, backend=backend).sum()
        return dk.dpo_loss_from_logits(x, labels, rc.float(), rr.float(), backend=backend).loss

    dk.token_logps(logits[:1, :1], labels[:1, :1], backend=backend)  # builds the native backend first
    with torch.no_grad(), _BigOutputs(shifted.numel()) as mode:
        run(shifted)
    assert mode.ops == []
    x, x_copy = shifted.detach().requires_grad_(), shifted.contiguous().requires_grad_()
    out, out_copy = run(x), run(x_copy)
    (grad,), (grad_copy,) = torch.autograd.grad(out, x), torch.autograd.grad(out_copy, x_copy)
    assert torch.equal(out, out_copy) and torch.equal(grad, grad_copy)


class _BigAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that allocate a new tensor of at least `numel` elements (views and in-place ops do not)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        seen = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)}  # fmt: skip
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel and t.untyped_storage().data_ptr() not in seen:
                self.ops.append(str(func))
        return out


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("entry", ["token_logps", "dpo_loss_from_logits"])
@pytest.mark.parametrize("inplace_grad", [False, True])
@pytest.mark.parametrize("window", ["[:, :-1]", "[:, 1:]", "[0, 2:-1]"])
def test_sliced_logits_gradient_written_whole(backend, entry, inplace_grad, window):
    """A row window of logits that require grad (the model's `outputs.logits[:, :-1]`): the backward writes the
    gradient of the whole tensor once (zero outside the window) instead of a window gradient that autograd's slice
    backward copies into a zero-filled tensor of the full shape; values and gradients equal a contiguous copy's."""
    logits, labels, rc, rr = _batch(2, 7, 37, torch.bfloat16)
    full = torch.cat([logits, logits[:, :2]], dim=1)  # [2B, T + 2, V]
    cut = {"[:, :-1]": (slice(None), slice(0, -2)), "[:, 1:]": (slice(None), slice(2, None))}
    index = cut.get(window, (0, slice(2, -1)))  # "[0, 2:-1]": one [N, V] sequence of the batch
    if window == "[0, 2:-1]":
        labels, entry = labels[0, : full.shape[1] - 3], "token_logps"  # one sequence: no pairs

    def run(x):
        if entry == "token_logps":
            return dk.token_logps(x, labels, backend=backend, inplace_grad=inplace_grad).sum()
        out = dk.dpo_loss_from_logits(x, labels, rc.float(), rr.float(), backend=backend, inplace_grad=inplace_grad)
        return out.loss

    dk.token_logps(logits[0, :1], labels.reshape(-1)[:1], backend=backend)  # builds the native backend first
    copy = full[index].detach().clone().requires_grad_()
    out_copy = run(copy * 1)  # (* 1: inplace_grad needs a non-leaf)
    (grad_copy,) = torch.autograd.grad(out_copy, copy)
    expected = torch.zeros_like(full)
    expected[index] = grad_copy
    model_logits = full.detach().clone().requires_grad_() * 1  # a layer's output
    x = model_logits[index]
    assert x._base is model_logits
    with _BigAllocations(full.numel()) as mode:
        out = run(x)
        (grad,) = torch.autograd.grad(out, model_logits)
    assert torch.equal(out, out_copy) and torch.equal(grad, expected)
    assert mode.ops == ([] if inplace_grad else ["dpo_kernels.token_logps_bwd.default"])  # the gradient alone


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("entry", ["logits", "logits+ref_logits", "packed", "hidden+ref_hidden"])
def test_values_read_once_per_call(monkeypatch, backend, entry):
    """A public call reads each tensor's values on the host once (labels, cu_seqlens), nested public calls included."""
    reads = []
    host_checks = checks._host_checks
    monkeypatch.setattr(checks, "_host_checks", lambda t: host_checks(t) and (reads.append(tuple(t.shape)) or True))
    B, T, V = 2, 5, 11
    x, labels = torch.randn(2 * B, T, V, requires_grad=True), torch.randint(0, V, (2 * B, T))
    ref = torch.zeros(B)
    if entry == "logits":
        dk.dpo_loss_from_logits(x, labels, ref, ref, backend=backend, return_stats=True)
    elif entry == "logits+ref_logits":
        dk.dpo_loss_from_logits(x, labels, ref_logits=x.detach(), backend=backend)
    elif entry == "packed":
        cu = torch.tensor([0, 5, 10, 15, 20])
        dk.dpo_loss_from_logits(x.reshape(-1, V), labels.reshape(-1), ref, ref, cu_seqlens=cu, backend=backend)
    else:
        h = torch.randn(2 * B, T, 8)
        dk.dpo_loss_from_hidden(h, torch.randn(V, 8), labels, ref_hidden=h, backend=backend, use_weighting=True)
    expected = [(2 * B * T,), (2 * B + 1,)] if entry == "packed" else [(2 * B, T)]
    assert sorted(reads) == sorted(expected)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_sliced_logits_keep_their_grad_and_hooks(backend):
    """A window whose own gradient is asked for (retain_grad, a hook) stays in the graph: its .grad and hooks see the
    window's gradient, and the whole tensor's gradient is the same as without them."""
    logits, labels, _, _ = _batch(2, 7, 37, torch.float32)
    full = torch.cat([logits, logits[:, :1]], dim=1).requires_grad_()
    x = full[:, :-1]
    x.retain_grad()
    seen = []
    x.register_hook(lambda g: seen.append(g.clone()))
    dk.token_logps(x, labels, backend=backend).sum().backward()
    ref = full.detach().clone().requires_grad_()
    dk.token_logps(ref[:, :-1], labels, backend=backend).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, full.grad[:, :-1]) and torch.equal(seen[0], x.grad)
    assert torch.equal(full.grad, ref.grad)
