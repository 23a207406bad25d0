"""Independent checks of `dpo_kernels.reference` against `shared/spec/dpo_losses.md` (TRL 1.16.0).

Every expected value here is written out from the spec's formulas (§1 losses, §3 log-probs, §3.1 LD-DPO, §4
f-divergences, §5 WPO, §6 closed-form gradients, §7 metrics), in float64, without calling any reference helper.
TRL 1.16 itself is a second oracle where that is cheap: `DPOTrainer._compute_loss` is run unbound on a stand-in
trainer and model (precomputed reference log-probs, so no model is built), and `ChunkedLogProbFunction` gives the
per-token statistics in fp32.

Inputs are fresh random float64 draws on every run (conftest seeds each test; DPO_KERNELS_SEED replays a run), in a
moderate regime (|z| of order 1) and a saturated one (|z| up to 1e3). Set DPO_KERNELS_ERR_REPORT=<path> to write the
largest error seen per loss type (values and gradients) as JSON.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import GRAD_TOL, assert_out_close

from dpo_kernels import losses as L
from dpo_kernels import reference as R

# float64 against float64: the reference and the formulas below are the same math in a different operation order
# (and sometimes a different but equivalent form, e.g. σ(−t) for 1 − σ(t)), so they agree to a few ulps times the
# conditioning of the expression. conftest's float64 gradient tolerance is that bound; it is used for values too.
F64 = GRAD_TOL[torch.float64]  # atol 1e-12, rtol 1e-10

LOG2 = math.log(2.0)
ALPHA_CLAMP = 80.0  # spec §4: C = 80 (fp32 / bf16); the project uses it for float64 too (losses.py)

DELTA_LOSSES = ("sigmoid", "hinge", "exo_pair", "robust", "discopop")
NORM_LOSSES = ("ipo", "sigmoid_norm")
RATIO_LOSSES = ("nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down")
SORT_LOSSES = ("aot", "aot_unpaired")
ALL_LOSSES = DELTA_LOSSES + NORM_LOSSES + RATIO_LOSSES + SORT_LOSSES + ("sft",)
F_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")  # spec §4


# ------------------------------------------------------------------------------------------------------------------
# Error bookkeeping for the report (largest |actual − expected| per loss type and quantity)

_MAX_ERR: dict[str, dict[str, float]] = defaultdict(lambda: {"abs": 0.0, "rel": 0.0, "of_tol": 0.0})


def _close(actual: torch.Tensor, expected: torch.Tensor, key: str | None = None, **tol) -> None:
    """float64 comparison with F64 (or `tol`); under `key`, records the largest abs error, relative error (where
    |expected| > 1e-6) and fraction of the allowed error atol + rtol·|expected|."""
    tol = tol or F64
    actual, expected = actual.double(), expected.double()
    if key is not None and actual.shape == expected.shape and actual.numel():
        same = (actual == expected) | (torch.isnan(actual) & torch.isnan(expected))
        diff = (actual - expected).abs().masked_fill(same, 0.0)
        big = expected.abs() > 1e-6
        rec = _MAX_ERR[key]
        rec["abs"] = max(rec["abs"], diff.max().item())
        rec["rel"] = max(rec["rel"], (diff[big] / expected[big].abs()).max().item() if big.any() else 0.0)
        rec["of_tol"] = max(rec["of_tol"], (diff / (tol["atol"] + tol["rtol"] * expected.abs())).max().item())
    torch.testing.assert_close(actual, expected, equal_nan=True, **tol)


@pytest.fixture(scope="module", autouse=True)
def _error_report():
    yield
    path = os.environ.get("DPO_KERNELS_ERR_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(dict(sorted(_MAX_ERR.items())), f, indent=1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Every shape here is tiny. torch 2.13's CPU `F.logsigmoid` (which the reference uses) opens a parallel region
    even for 3 elements and costs ~15 ms per call with 2 threads on a loaded machine (4 µs with one), which alone
    would take this file past a minute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------------------
# The spec's formulas, float64


def logsig(x: torch.Tensor) -> torch.Tensor:
    """Stable log σ(x) = min(x, 0) − log1p(exp(−|x|)) (spec §9)."""
    return torch.clamp(x, max=0.0) - torch.log1p(torch.exp(-x.abs()))


def sig(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x)


def f_map(name: str, a: float):
    """Spec §4: (f, f') of an f-divergence; the alpha divergence with |a − 1| < 1e-6 is the reverse KL."""
    if name == "reverse_kl" or (name == "alpha_divergence" and abs(a - 1.0) < 1e-6):
        return (lambda x: x), (lambda x: torch.ones_like(x))
    if name == "forward_kl":
        return (lambda x: 1.0 - torch.exp(-x)), (lambda x: torch.exp(-x))
    if name == "js_divergence":
        return (lambda x: LOG2 + logsig(x)), (lambda x: sig(-x))
    if name == "alpha_divergence":
        return (
            lambda x: (torch.exp(torch.clamp((a - 1.0) * x, max=ALPHA_CLAMP)) - 1.0) / (a - 1.0),
            lambda x: torch.where((a - 1.0) * x < ALPHA_CLAMP, torch.exp((a - 1.0) * x), 0.0),
        )
    raise KeyError(name)


def _discopop(z, tau):
    # ℓ = −logσ(z)·(1 − m) + exp(−z)·m, m = σ(z/τ); 1 − m = σ(−z/τ) and exp(−z)·m = exp(−z + logσ(z/τ)).
    return -logsig(z) * sig(-z / tau) + torch.exp(-z + logsig(z / tau))


def _discopop_grad(z, tau):
    # §6: gz = −σ(−z)(1−m) + m'·(logσ(z) + e^{−z}) − e^{−z}·m, m' = m(1−m)/τ, products taken in log space.
    log_m, log_1m = logsig(z / tau), logsig(-z / tau)
    m_prime = torch.exp(log_m + log_1m) / tau
    return (
        -sig(-z) * torch.exp(log_1m) + m_prime * logsig(z) + torch.exp(log_m + log_1m - z) / tau - torch.exp(-z + log_m)
    )


# Δ-losses, spec §1 and §6: name -> (ℓ(z, ε, τ), ∂ℓ/∂z(z, ε, τ)).
DELTA_TABLE = {
    "sigmoid": (lambda z, e, t: -logsig(z), lambda z, e, t: -sig(-z)),
    "hinge": (lambda z, e, t: torch.relu(1.0 - z), lambda z, e, t: torch.where(z < 1.0, -1.0, 0.0).to(z)),
    "exo_pair": (
        lambda z, e, t: sig(z) * (logsig(z) - math.log1p(-e)) + sig(-z) * (logsig(-z) - math.log(e)),
        lambda z, e, t: sig(z) * sig(-z) * (z - math.log1p(-e) + math.log(e)),
    ),
    "robust": (
        lambda z, e, t: (-(1.0 - e) * logsig(z) + e * logsig(-z)) / (1.0 - 2.0 * e),
        lambda z, e, t: (-(1.0 - e) * sig(-z) - e * sig(z)) / (1.0 - 2.0 * e),
    ),
    "discopop": (lambda z, e, t: _discopop(z, t), lambda z, e, t: _discopop_grad(z, t)),
}

# Log-ratio losses, spec §1 and §6: name -> (xc, xr, β) -> (ℓ, ∂ℓ/∂pc, ∂ℓ/∂pr).
RATIO_TABLE = {
    "nca_pair": lambda xc, xr, b: (
        -logsig(b * xc) - 0.5 * logsig(-b * xc) - 0.5 * logsig(-b * xr),
        b * (-sig(-b * xc) + 0.5 * sig(b * xc)),
        0.5 * b * sig(b * xr),
    ),
    "bco_pair": lambda xc, xr, b: (
        -logsig(b * xc) - logsig(-b * xr),
        -b * sig(-b * xc),
        b * sig(b * xr),
    ),
    "sppo_hard": lambda xc, xr, b: (
        (xc - 1.0 / (2.0 * b)) ** 2 + (xr + 1.0 / (2.0 * b)) ** 2,
        2.0 * (xc - 1.0 / (2.0 * b)),
        2.0 * (xr + 1.0 / (2.0 * b)),
    ),
    "apo_zero": lambda xc, xr, b: (
        1.0 - sig(b * xc) + sig(b * xr),
        -b * sig(b * xc) * sig(-b * xc),
        b * sig(b * xr) * sig(-b * xr),
    ),
    "apo_down": lambda xc, xr, b: (
        sig(b * xc) + 1.0 - sig(b * (xc - xr)),
        b * sig(b * xc) * sig(-b * xc) - b * sig(b * (xc - xr)) * sig(-b * (xc - xr)),
        b * sig(b * (xc - xr)) * sig(-b * (xc - xr)),
    ),
}


def spec_term(
    name: str,
    pc: torch.Tensor,
    pr: torch.Tensor,
    rc: torch.Tensor,
    rr: torch.Tensor,
    *,
    beta: float,
    eps: float = 0.0,
    tau: float = 0.05,
    fdiv: str = "reverse_kl",
    acoef: float = 0.5,
    nc: torch.Tensor | None = None,
    nr: torch.Tensor | None = None,
    sft_sum: torch.Tensor | None = None,
    sft_count: torch.Tensor | None = None,
    w: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One loss term: the per-pair loss ℓ [B] (§1; times the WPO pair weight `w`, §5) and the §6 gradient of
    mean_i ℓ_i with respect to pc, pr, rc, rr and the sft token-log-prob sum ("sft")."""
    pc, pr, rc, rr = (t.detach().double() for t in (pc, pr, rc, rr))
    B = pc.shape[0]
    wt = torch.ones_like(pc) if w is None else w.double()
    xc, xr = pc - rc, pr - rr
    f, df = f_map(fdiv, acoef)
    zero = torch.zeros_like(pc)
    grads = {"pc": zero, "pr": zero, "rc": zero, "rr": zero, "sft": zero}
    if name in DELTA_TABLE:
        z = beta * (f(xc) - f(xr))
        ell, gz = DELTA_TABLE[name][0](z, eps, tau), DELTA_TABLE[name][1](z, eps, tau)
        gc, gr = beta * gz * df(xc), -beta * gz * df(xr)
    elif name in NORM_LOSSES:
        ncl, nrl = nc.double().clamp(min=1.0), nr.double().clamp(min=1.0)
        u = f(xc) / ncl - f(xr) / nrl
        if name == "ipo":
            ell, gu = (u - 1.0 / (2.0 * beta)) ** 2, 2.0 * (u - 1.0 / (2.0 * beta))
        else:
            ell, gu = -logsig(beta * u), -beta * sig(-beta * u)
        gc, gr = gu * df(xc) / ncl, -gu * df(xr) / nrl
    elif name in RATIO_TABLE:
        ell, gc, gr = RATIO_TABLE[name](xc, xr, beta)
    elif name in SORT_LOSSES:
        assert w is None
        a, b = (pc - pr, rc - rr) if name == "aot" else (xc, xr)
        a_sorted, ia = torch.sort(a)
        b_sorted, ib = torch.sort(b)
        d = a_sorted - b_sorted
        ell = -(1.0 - eps) * logsig(beta * d) - eps * logsig(-beta * d)
        g = beta * (-(1.0 - eps) * sig(-beta * d) + eps * sig(beta * d)) / B
        ga, gb = zero.clone(), zero.clone()
        ga[ia], gb[ib] = g, -g
        if name == "aot":  # a = pc − pr, b = rc − rr
            grads = {**grads, "pc": ga, "pr": -ga, "rc": gb, "rr": -gb}
        else:  # a = xc, b = xr
            grads = {**grads, "pc": ga, "rc": -ga, "pr": gb, "rr": -gb}
        return ell, grads
    elif name == "sft":
        n_tok = max(1.0, float(sft_count.sum()))
        ell = torch.full_like(pc, -float(sft_sum.double().sum()) / n_tok)
        grads = {**grads, "sft": torch.full_like(pc, -float(wt.mean()) / n_tok)}
        return ell * wt, grads
    else:
        raise KeyError(name)
    gc, gr = gc * wt / B, gr * wt / B
    return ell * wt, {**grads, "pc": gc, "pr": gr, "rc": -gc, "rr": -gr}


def spec_mix(names, weights, pc, pr, rc, rr, **kw):
    """Spec §2: losses [K, B] and loss = Σ_k w_k mean(ℓ_k), with the summed gradients (sft's folded into pc)."""
    weights = [1.0] * len(names) if weights is None else weights
    rows, total = [], {k: torch.zeros_like(pc.double()) for k in ("pc", "pr", "rc", "rr", "sft")}
    for name, wk in zip(names, weights):
        ell, g = spec_term(name, pc, pr, rc, rr, **kw)
        rows.append(ell)
        for k in total:
            total[k] = total[k] + wk * g[k]
    losses = torch.stack(rows)
    loss = sum(wk * row.mean() for wk, row in zip(weights, rows))
    return losses, loss, total


def spec_reward_metrics(pc, pr, rc, rr, beta):
    """Spec §7, the reward and log-prob keys."""
    pc, pr, rc, rr = (t.detach().double() for t in (pc, pr, rc, rr))
    c, r = beta * (pc - rc), beta * (pr - rr)
    return {
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
        "rewards/margins": (c - r).mean(),
        "rewards/accuracies": (c > r).double().mean(),
        "logps/chosen": pc.mean(),
        "logps/rejected": pr.mean(),
    }


def spec_stats_metrics(ent, mean_logit, top1, n):
    """Spec §7, the token-weighted keys, from per-sequence sums [2B] (rows: chosen then rejected)."""
    B = n.shape[0] // 2

    def ratio(num, den):
        den = float(den)
        return torch.tensor(float(num) / den if den > 0 else 0.0, dtype=torch.float64)

    return {
        "logits/chosen": ratio(mean_logit[:B].sum(), n[:B].sum()),
        "logits/rejected": ratio(mean_logit[B:].sum(), n[B:].sum()),
        "entropy": ratio(ent.sum(), n.sum()),
        "mean_token_accuracy": ratio(top1[:B].sum(), n[:B].sum()),
    }


def check_metrics(metrics: dict, expected: dict, fp32_keys: tuple[str, ...] = ()) -> None:
    """`fp32_keys`: expected values that are themselves fp32-rounded (compared with conftest's OUT_TOL)."""
    for key, value in expected.items():
        assert key in metrics, f"metric {key!r} missing; got {sorted(metrics)}"
        m = metrics[key]
        assert isinstance(m, torch.Tensor) and m.dim() == 0, f"{key}: expected a 0-dim tensor, got {m!r}"
        # INTERFACES.md says fp32; the reference keeps float64 for float64 inputs (an oracle should): then F64.
        assert m.dtype in (torch.float32, torch.float64), f"{key}: {m.dtype}"
        if m.dtype == torch.float64 and key not in fp32_keys:
            _close(m, torch.as_tensor(value, dtype=torch.float64), "metrics/value")
        else:
            assert_out_close(m, torch.as_tensor(value, dtype=torch.float64))


# --- per-token quantities (spec §3), float64 and direct --------------------------------------------------------


def spec_tokens(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, ignore_index: int = -100):
    """lp (differentiable), entropy −Σ p log p, mean_v of logits/T, first-argmax is_top1, log Σ p²; 0 / False at
    ignored positions. Everything on logits / temperature."""
    x = logits.double() / temperature
    logp_all = torch.log_softmax(x, dim=-1)
    valid = labels != ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels))
    lp = torch.where(valid, logp_all.gather(-1, y.unsqueeze(-1)).squeeze(-1), 0.0)
    with torch.no_grad():
        p = logp_all.exp()
        ent = torch.where(p > 0, -p * logp_all, 0.0).sum(-1)
        mean_logit = x.mean(-1)
        x_y = x.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        earlier = torch.arange(x.shape[-1]) < y.unsqueeze(-1)
        strictly_above_earlier = (x.masked_fill(~earlier, -math.inf) < x_y.unsqueeze(-1)).all(-1)
        top1 = (x_y >= x.amax(-1)) & strictly_above_earlier
        lssp = torch.log((p * p).sum(-1))
    zero = torch.zeros((), dtype=torch.float64)
    return SimpleNamespace(
        lp=lp,
        ent=torch.where(valid, ent, zero),
        mean_logit=torch.where(valid, mean_logit, zero),
        top1=top1 & valid,
        lssp=torch.where(valid, lssp, zero),
        p=p,
        y=y,
        valid=valid,
    )


def ld_token_weights(mask: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """Spec §3.1 on a padded mask [2B, T]: 1 for the k-th scored token with k ≤ min(n_c, n_r), α after, 0 where
    not scored."""
    mask = mask.bool()
    if alpha is None:
        return mask.double()
    B = mask.shape[0] // 2
    k = mask.long().cumsum(1)
    n = mask.sum(1)
    shared = torch.minimum(n[:B], n[B:]).repeat(2)
    one, a = torch.tensor(1.0, dtype=torch.float64), torch.tensor(alpha, dtype=torch.float64)  # not fp32 scalars
    return torch.where(k <= shared.unsqueeze(1), one, a) * mask


# ------------------------------------------------------------------------------------------------------------------
# Inputs


def make_pairs(B: int, regime: str, beta: float, scale: float = 1.5):
    """pc, pr, rc, rr [B] float64 and completion lengths nc, nr [B] int64 in [1, 64).

    moderate: log-ratios ~ N(0, (scale/β)²), so z = β·Δ is of order `scale`. saturated: log-ratios uniform in
    ±500/β, with pair 0 at z = +1000 and pair 1 at z = −1000 exactly in the log-ratios (|z| ≤ 1e3 everywhere)."""
    rc = -(20.0 + 280.0 * torch.rand(B, dtype=torch.float64))
    rr = -(20.0 + 280.0 * torch.rand(B, dtype=torch.float64))
    if regime == "moderate":
        xc = (scale / beta) * torch.randn(B, dtype=torch.float64)
        xr = (scale / beta) * torch.randn(B, dtype=torch.float64)
    else:
        half = 500.0 / beta
        xc = half * (2.0 * torch.rand(B, dtype=torch.float64) - 1.0)
        xr = half * (2.0 * torch.rand(B, dtype=torch.float64) - 1.0)
        xc[0], xr[0], xc[1], xr[1] = half, -half, -half, half
    nc = torch.randint(1, 64, (B,))
    nr = torch.randint(1, 64, (B,))
    return rc + xc, rr + xr, rc, rr, nc, nr


def leafs(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def grads_of(loss: torch.Tensor, inputs):
    """Gradients under a random scalar upstream gradient (returned with it)."""
    g = torch.rand((), dtype=torch.float64) + 0.5
    out = torch.autograd.grad(loss * g, inputs, allow_unused=True)
    return [torch.zeros_like(i) if o is None else o for i, o in zip(inputs, out)], g


# Loss options every single-loss test uses: ε = 0.3 is valid for every loss that reads it (robust needs < 0.5,
# exo_pair > 0) and must be ignored by all the others (sigmoid included: no cDPO smoothing in 1.16, §1).
EPS = 0.3
REGIMES = [
    pytest.param("moderate", 0.1, id="moderate-beta0.1"),
    pytest.param("moderate", 2.0, id="moderate-beta2"),
    pytest.param("saturated", 0.1, id="saturated-beta0.1"),
]


# ------------------------------------------------------------------------------------------------------------------
# dpo_loss: every loss type alone


@pytest.mark.parametrize("regime,beta", REGIMES)
@pytest.mark.parametrize("loss_type", ALL_LOSSES)
def test_single_loss(loss_type, regime, beta):
    B = 8
    pc, pr, rc, rr, nc, nr = make_pairs(B, regime, beta)
    ins = leafs(pc, pr, rc, rr)
    out = R.dpo_loss(*ins, loss_type=loss_type, beta=beta, label_smoothing=EPS, chosen_lengths=nc, rejected_lengths=nr)
    exp_losses, exp_loss, exp_g = spec_mix(
        [loss_type], None, pc, pr, rc, rr, beta=beta, eps=EPS, nc=nc, nr=nr, sft_sum=pc, sft_count=nc
    )
    (gpc, gpr, grc, grr), g = grads_of(out.loss, ins)

    assert out.loss.dim() == 0 and out.losses.shape == (1, B)
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.loss), "the math is finite here"
    _close(out.losses, exp_losses, f"{loss_type}/value")
    _close(out.loss, exp_loss, f"{loss_type}/value")
    _close(gpc, g * (exp_g["pc"] + exp_g["sft"]), f"{loss_type}/grad")
    _close(gpr, g * exp_g["pr"], f"{loss_type}/grad")
    _close(grc, g * exp_g["rc"], f"{loss_type}/grad")
    _close(grr, g * exp_g["rr"], f"{loss_type}/grad")
    # Rewards are β·log-ratio, detached (§7); chosen/rejected log-probs pass through.
    _close(out.chosen_rewards, beta * (pc - rc))
    _close(out.rejected_rewards, beta * (pr - rr))
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    _close(out.chosen_logps.detach(), pc)
    _close(out.rejected_logps.detach(), pr)
    check_metrics(out.metrics, spec_reward_metrics(pc, pr, rc, rr, beta))


# Hand-computed values (spec §1) at log-ratios 0 (z = 0, m = ½ for discopop), β = 0.1, ε = 0.2, B = 2.
_E = 0.2
HAND = {
    "sigmoid": LOG2,
    "hinge": 1.0,
    "ipo": 25.0,  # (0 − 1/(2β))²
    "exo_pair": -LOG2 - 0.5 * math.log(_E * (1 - _E)),
    "nca_pair": 2 * LOG2,
    "robust": LOG2,
    "bco_pair": 2 * LOG2,
    "sppo_hard": 50.0,
    "aot": LOG2,
    "aot_unpaired": LOG2,
    "apo_zero": 1.0,
    "apo_down": 1.0,
    "discopop": (LOG2 + 1.0) / 2.0,
    "sft": 8.0 / 6.0,  # −(−3 − 5) / (2 + 4)
    "sigmoid_norm": LOG2,
}


@pytest.mark.parametrize("loss_type", ALL_LOSSES)
def test_hand_computed_at_zero(loss_type):
    pc = torch.tensor([-3.0, -5.0], dtype=torch.float64)
    out = R.dpo_loss(
        pc,
        pc.clone(),
        pc.clone(),
        pc.clone(),
        loss_type=loss_type,
        beta=0.1,
        label_smoothing=_E,
        chosen_lengths=torch.tensor([2, 4]),
        rejected_lengths=torch.tensor([3, 1]),
    )
    _close(out.losses, torch.full((1, 2), HAND[loss_type], dtype=torch.float64))


def test_hand_computed_aot_sorting():
    # a = pc − pr = [0, 1] → [0, 1]; b = rc − rr = [0, −2] → [−2, 0]; d = [2, 1] by rank (not by pair).
    beta = 0.5
    pc, pr = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    rc, rr = torch.zeros(2, dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)
    out = R.dpo_loss(pc, pr, rc, rr, loss_type="aot", beta=beta)
    d = torch.tensor([2.0, 1.0], dtype=torch.float64)
    _close(out.losses[0], -logsig(beta * d))
    # aot_unpaired: xc = [0, 1], xr = [0, −2] → d = [0 − (−2), 1 − 0] = [2, 1]; with ε the flipped term enters.
    out = R.dpo_loss(pc, pr, rc, rr, loss_type="aot_unpaired", beta=beta, label_smoothing=0.25)
    _close(out.losses[0], -0.75 * logsig(beta * d) - 0.25 * logsig(-beta * d))


def test_hinge_kink_has_zero_gradient():
    # β·Δ = 0.5 · 2 = 1 exactly: ℓ = 0 and ∂ℓ/∂z = 0 (spec §6, §9: torch's relu'(0) = 0).
    pc, pr, rc, rr = leafs(*(torch.tensor([v], dtype=torch.float64) for v in (2.0, 0.0, 0.0, 0.0)))
    out = R.dpo_loss(pc, pr, rc, rr, loss_type="hinge", beta=0.5)
    assert out.loss.item() == 0.0
    for grad in torch.autograd.grad(out.loss, (pc, pr, rc, rr)):
        assert grad.item() == 0.0


def test_accuracies_are_strict():
    # Ties (xc == xr exactly) count 0 (spec §7).
    B = 8
    pc, pr, rc, rr, _, _ = make_pairs(B, "moderate", 0.1)
    pr[:3], rr[:3] = pc[:3], rc[:3]
    out = R.dpo_loss(pc, pr, rc, rr, beta=0.1)
    expected = ((pc - rc)[3:] > (pr - rr)[3:]).double().sum() / B
    check_metrics(out.metrics, {"rewards/accuracies": expected})
    assert set(L.REWARD_METRICS) <= set(out.metrics)


def test_robust_with_zero_smoothing_is_sigmoid():
    pc, pr, rc, rr, _, _ = make_pairs(8, "moderate", 0.1)
    a = R.dpo_loss(pc, pr, rc, rr, loss_type="robust", beta=0.1, label_smoothing=0.0)
    b = R.dpo_loss(pc, pr, rc, rr, loss_type="sigmoid", beta=0.1)
    _close(a.losses, b.losses)


@pytest.mark.parametrize("tau", [0.05, 0.5, 3.0], ids=lambda t: f"tau{t}")
def test_discopop_tau(tau):
    beta = 0.1
    pc, pr, rc, rr, _, _ = make_pairs(8, "moderate", beta)
    ins = leafs(pc, pr, rc, rr)
    out = R.dpo_loss(*ins, loss_type="discopop", beta=beta, discopop_tau=tau)
    exp_losses, _, exp_g = spec_mix(["discopop"], None, pc, pr, rc, rr, beta=beta, tau=tau)
    _close(out.losses, exp_losses, "discopop/value")
    (gpc, gpr, _, _), g = grads_of(out.loss, ins)
    _close(gpc, g * exp_g["pc"], "discopop/grad")
    _close(gpr, g * exp_g["pr"], "discopop/grad")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("z", [-89.0, -1000.0, -88.0, 1000.0], ids=lambda z: f"z{z:g}")
def test_discopop_saturated_is_finite(z, dtype):
    # TRL 1.16 gives NaN for z < −88.7 in fp32 / −709 in fp64 (spec §9); the math is finite: ℓ ≈ −logσ(z).
    beta = 0.1
    pc = torch.tensor([z / beta], dtype=torch.float64)
    zeros = torch.zeros(1, dtype=torch.float64)
    ins = leafs(pc.to(dtype), zeros.to(dtype), zeros.to(dtype), zeros.to(dtype))
    out = R.dpo_loss(*ins, loss_type="discopop", beta=beta)
    grads = torch.autograd.grad(out.loss, ins)
    exp_losses, _, exp_g = spec_mix(["discopop"], None, pc, zeros, zeros, zeros, beta=beta)
    assert torch.isfinite(out.loss) and all(torch.isfinite(gr).all() for gr in grads)
    if dtype == torch.float64:
        _close(out.losses, exp_losses, "discopop/value")
        _close(grads[0], exp_g["pc"], "discopop/grad")
    else:
        assert_out_close(out.losses, exp_losses)
        torch.testing.assert_close(grads[0], exp_g["pc"].float(), **GRAD_TOL[torch.float32])


def test_nan_in_nan_out():
    pc, pr, rc, rr, nc, nr = make_pairs(4, "moderate", 0.1)
    pc[2] = float("nan")
    for loss_type in ("sigmoid", "ipo", "aot"):
        out = R.dpo_loss(pc, pr, rc, rr, loss_type=loss_type, chosen_lengths=nc, rejected_lengths=nr)
        assert torch.isnan(out.loss), loss_type


# ------------------------------------------------------------------------------------------------------------------
# dpo_loss: weighted mixes (§2)

MIXES = [
    pytest.param(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], id="mpo"),
    pytest.param(["sigmoid", "sft"], [1.0, 0.3], id="rpo-like"),
    pytest.param(["ipo", "sigmoid_norm", "aot", "apo_down"], [0.5, 2.0, -0.7, 1.5], id="norm-and-sorted"),
    pytest.param(list(ALL_LOSSES), None, id="all15-unit-weights"),
    pytest.param(["hinge", "hinge"], [0.25, 0.5], id="repeated-name"),
]


@pytest.mark.parametrize("regime", ["moderate", "saturated"])
@pytest.mark.parametrize("names,weights", MIXES)
def test_mix(names, weights, regime):
    B, beta = 6, 0.1
    pc, pr, rc, rr, nc, nr = make_pairs(B, regime, beta)
    ins = leafs(pc, pr, rc, rr)
    out = R.dpo_loss(
        *ins,
        loss_type=names,
        loss_weights=weights,
        beta=beta,
        label_smoothing=EPS,
        chosen_lengths=nc,
        rejected_lengths=nr,
    )
    exp_losses, exp_loss, exp_g = spec_mix(
        names, weights, pc, pr, rc, rr, beta=beta, eps=EPS, nc=nc, nr=nr, sft_sum=pc, sft_count=nc
    )
    (gpc, gpr, grc, grr), g = grads_of(out.loss, ins)
    assert out.losses.shape == (len(names), B)
    _close(out.losses, exp_losses, "mix/value")
    _close(out.loss, exp_loss, "mix/value")
    _close(gpc, g * (exp_g["pc"] + exp_g["sft"]), "mix/grad")
    _close(gpr, g * exp_g["pr"], "mix/grad")
    _close(grc, g * exp_g["rc"], "mix/grad")
    _close(grr, g * exp_g["rr"], "mix/grad")


def test_sft_token_level_mean():
    # sft = −Σ(chosen token log-probs) / Σ(chosen token counts) over the batch, broadcast to [B] (§1); it reads
    # neither the rejected nor the reference log-probs, nor β.
    B = 5
    pc, pr, rc, rr, nc, nr = make_pairs(B, "moderate", 0.1)
    tok_sum = -100.0 * torch.rand(B, dtype=torch.float64)
    count = torch.randint(0, 40, (B,))
    count[0] = 0
    ins = leafs(pc, pr, rc, rr, tok_sum)
    outs = [
        R.dpo_loss(
            *ins[:4],
            loss_type="sft",
            beta=beta,
            chosen_lengths=nc,
            chosen_token_logp_sum=ins[4],
            chosen_token_count=count,
        )
        for beta in (0.1, 3.0)
    ]
    expected = -tok_sum.sum() / count.sum()
    for out in outs:
        _close(out.losses, expected.expand(1, B), "sft/value")
    grads = torch.autograd.grad(outs[0].loss, ins, allow_unused=True)
    for grad in grads[:4]:
        grad = torch.zeros(B) if grad is None else grad
        assert (grad == 0).all(), "sft reads only the chosen token log-prob sums"
    _close(grads[4], torch.full((B,), -1.0 / float(count.sum()), dtype=torch.float64), "sft/grad")


def test_sft_count_defaults_to_chosen_lengths():
    pc, pr, rc, rr, nc, nr = make_pairs(4, "moderate", 0.1)
    out = R.dpo_loss(pc, pr, rc, rr, loss_type="sft", chosen_lengths=nc, rejected_lengths=nr)
    _close(out.losses, (-pc.sum() / nc.sum()).expand(1, 4))


@pytest.mark.parametrize("loss_type", NORM_LOSSES)
def test_length_normalisation(loss_type):
    # Each score divided by its own completion length, clamped ≥ 1 (§0, §1); lengths of 0 count as 1.
    B, beta = 6, 0.1
    pc, pr, rc, rr, nc, nr = make_pairs(B, "moderate", beta)
    nc[0], nr[1] = 0, 0
    ins = leafs(pc, pr, rc, rr)
    out = R.dpo_loss(*ins, loss_type=loss_type, beta=beta, chosen_lengths=nc, rejected_lengths=nr)
    ncl, nrl = nc.double().clamp(min=1), nr.double().clamp(min=1)
    u = (pc - rc) / ncl - (pr - rr) / nrl
    expected = (u - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -logsig(beta * u)
    _close(out.losses[0], expected, f"{loss_type}/value")
    # Scaling both lengths by k is not the same loss (the normalisation is really applied).
    other = R.dpo_loss(pc, pr, rc, rr, loss_type=loss_type, beta=beta, chosen_lengths=3 * nc, rejected_lengths=nr)
    assert not torch.allclose(other.losses, out.losses.detach())


# ------------------------------------------------------------------------------------------------------------------
# f-divergences (§4)

FDIVS = [
    pytest.param("forward_kl", 0.5, "moderate", id="forward_kl"),
    pytest.param("js_divergence", 0.5, "moderate", id="js"),
    pytest.param("alpha_divergence", 0.5, "moderate", id="alpha0.5"),
    pytest.param("alpha_divergence", 2.0, "moderate", id="alpha2"),
    pytest.param("alpha_divergence", 0.3, "moderate", id="alpha0.3"),
    pytest.param("js_divergence", 0.5, "saturated", id="js-saturated"),
    # (a − 1)·x reaches ±500: the clamp at 80 (f' = 0 above it) is exercised on one side.
    pytest.param("alpha_divergence", 0.5, "saturated", id="alpha0.5-saturated"),
    pytest.param("alpha_divergence", 1.5, "saturated", id="alpha1.5-saturated"),
]


@pytest.mark.parametrize("fdiv,acoef,regime", FDIVS)
@pytest.mark.parametrize("loss_type", F_LOSSES)
def test_f_divergence(loss_type, fdiv, acoef, regime):
    # ipo / sigmoid_norm keep the additive constants (1, log 2, −1/(a−1)) since each score has its own length.
    B, beta = 8, 0.5
    pc, pr, rc, rr, nc, nr = make_pairs(B, regime, beta, scale=1.0)
    ins = leafs(pc, pr, rc, rr)
    kw = dict(beta=beta, label_smoothing=EPS, chosen_lengths=nc, rejected_lengths=nr)
    out = R.dpo_loss(*ins, loss_type=loss_type, f_divergence_type=fdiv, f_alpha_divergence_coef=acoef, **kw)
    exp_losses, exp_loss, exp_g = spec_mix(
        [loss_type], None, pc, pr, rc, rr, beta=beta, eps=EPS, fdiv=fdiv, acoef=acoef, nc=nc, nr=nr,
        sft_sum=pc, sft_count=nc,
    )  # fmt: skip
    assert torch.isfinite(out.losses).all()
    _close(out.losses, exp_losses, f"{loss_type}/value")
    (gpc, gpr, grc, grr), g = grads_of(out.loss, ins)
    _close(gpc, g * (exp_g["pc"] + exp_g["sft"]), f"{loss_type}/grad")
    _close(gpr, g * exp_g["pr"], f"{loss_type}/grad")
    _close(grc, g * exp_g["rc"], f"{loss_type}/grad")
    _close(grr, g * exp_g["rr"], f"{loss_type}/grad")
    # Rewards and metrics always use the plain log-ratios (§4, §7).
    _close(out.chosen_rewards, beta * (pc - rc))
    check_metrics(out.metrics, spec_reward_metrics(pc, pr, rc, rr, beta))


@pytest.mark.parametrize("acoef", [1.0, 1.0 + 5e-7, 1.0 - 9e-7], ids=["a1", "a1+5e-7", "a1-9e-7"])
@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm", "sigmoid"])
def test_alpha_divergence_near_one_is_reverse_kl(loss_type, acoef):
    pc, pr, rc, rr, nc, nr = make_pairs(6, "moderate", 0.5, scale=1.0)
    kw = dict(loss_type=loss_type, beta=0.5, chosen_lengths=nc, rejected_lengths=nr)
    a = R.dpo_loss(pc, pr, rc, rr, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=acoef, **kw)
    b = R.dpo_loss(pc, pr, rc, rr, **kw)
    _close(a.losses, b.losses)
    # Just outside the threshold the alpha formula applies (no longer reverse_kl for ipo).
    acoef_out = 1.0 + 5e-6
    c = R.dpo_loss(pc, pr, rc, rr, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=acoef_out, **kw)
    exp_losses, _, _ = spec_mix(
        [loss_type], None, pc, pr, rc, rr, beta=0.5, fdiv="alpha_divergence", acoef=acoef_out, nc=nc, nr=nr
    )
    _close(c.losses, exp_losses, rtol=1e-9, atol=1e-12)  # (e^{(a−1)x} − 1)/(a − 1) loses ~6 digits at a−1 = 5e-6


@pytest.mark.parametrize("loss_type", [n for n in L.LOSS_TYPES if n not in F_LOSSES])
def test_f_divergence_refused(loss_type):
    pc, pr, rc, rr, nc, nr = make_pairs(4, "moderate", 0.1)
    with pytest.raises(ValueError, match=rf"f_divergence_type 'js_divergence' is not supported.*'{loss_type}'"):
        R.dpo_loss(pc, pr, rc, rr, loss_type=loss_type, f_divergence_type="js_divergence")


# ------------------------------------------------------------------------------------------------------------------
# WPO (§5): each term times the pair weight w_c·w_r before its mean; hinge and sft work here (TRL 1.16 breaks).


@pytest.mark.parametrize(
    "names,weights",
    [pytest.param([n], None, id=n) for n in ALL_LOSSES if n not in SORT_LOSSES]
    + [
        pytest.param(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], id="mpo"),
        pytest.param(["hinge", "sft"], [1.0, 0.5], id="hinge+sft"),
    ],
)
def test_wpo_pair_weights(names, weights):
    B, beta = 6, 0.1
    pc, pr, rc, rr, nc, nr = make_pairs(B, "moderate", beta)
    seq_w = torch.exp(-3.0 * torch.rand(2 * B, dtype=torch.float64))  # per-sequence weights in (e^-3, 1]
    ins = leafs(pc, pr, rc, rr)
    out = R.dpo_loss(
        *ins,
        loss_type=names,
        loss_weights=weights,
        beta=beta,
        label_smoothing=EPS,
        chosen_lengths=nc,
        rejected_lengths=nr,
        wpo_weights=seq_w,
    )
    pair_w = seq_w[:B] * seq_w[B:]
    exp_losses, exp_loss, exp_g = spec_mix(
        names, weights, pc, pr, rc, rr, beta=beta, eps=EPS, nc=nc, nr=nr, sft_sum=pc, sft_count=nc, w=pair_w
    )
    _close(out.losses, exp_losses, "wpo/value")
    _close(out.loss, exp_loss, "wpo/value")
    (gpc, gpr, grc, grr), g = grads_of(out.loss, ins)
    _close(gpc, g * (exp_g["pc"] + exp_g["sft"]), "wpo/grad")
    _close(gpr, g * exp_g["pr"], "wpo/grad")
    _close(grc, g * exp_g["rc"], "wpo/grad")
    _close(grr, g * exp_g["rr"], "wpo/grad")
    # Rewards are not weighted.
    _close(out.chosen_rewards, beta * (pc - rc))


def test_wpo_weights_function():
    # w_r = exp((1/max(1, n_r)) Σ_t m (lp − log Σ p²)), per sequence, no gradient (§5); lp not LD-weighted.
    S, T, V = 6, 9, 13
    logits = 3.0 * torch.randn(S, T, V, dtype=torch.float64, requires_grad=True)
    labels = random_labels(S, T, V)
    labels[1] = -100  # a sequence without tokens: n' = max(1, 0)
    lp, stats = R.token_logps(logits, labels, return_stats=True)
    seq = R.sequence_logps(lp, labels, ld_alpha=0.3, token_stats=stats)
    w = R.wpo_weights(seq)
    tok = spec_tokens(logits, labels)
    n = tok.valid.sum(1).double().clamp(min=1)
    expected = torch.exp(((tok.lp.detach() - tok.lssp) * tok.valid).sum(1) / n)
    _close(w, expected, "wpo/value")
    assert not w.requires_grad
    assert w[1].item() == 1.0


# ------------------------------------------------------------------------------------------------------------------
# Per-token log-probs and statistics (§3)


def random_labels(S: int, T: int, V: int, *, hole: bool = True) -> torch.Tensor:
    """Labels [S, T]: a prompt of −100, a completion of random tokens, right padding of −100; some rows have no
    completion token, and (with `hole`) one row has an ignored token inside its completion."""
    labels = torch.full((S, T), -100, dtype=torch.long)
    for r in range(S):
        start = int(torch.randint(0, T // 2 + 1, ()))
        length = int(torch.randint(0, T - start + 1, ()))
        labels[r, start : start + length] = torch.randint(0, V, (length,))
    if hole and S > 2:
        labels[2, 1 : T - 1] = torch.randint(0, V, (T - 2,))
        labels[2, T // 2] = -100
    return labels


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5], ids=lambda t: f"T{t}")
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((5, 7, 11), id="3d-V11"),
        pytest.param((13, 2), id="2d-V2"),  # the smallest vocabulary with a choice
        pytest.param((4, 6, 1001), id="3d-V1001"),  # a vocabulary that is not a multiple of anything
    ],
)
def test_token_logps_float64(shape, temperature):
    *lead, V = shape
    logits = 4.0 * torch.randn(*shape, dtype=torch.float64)
    labels = torch.randint(0, V, tuple(lead))
    labels.view(-1)[::3] = -100
    lp = R.token_logps(logits, labels, temperature=temperature)
    lp_s, stats = R.token_logps(logits, labels, temperature=temperature, return_stats=True)
    tok = spec_tokens(logits, labels, temperature=temperature)
    assert lp.dtype == torch.float64 and lp.shape == labels.shape
    _close(lp, tok.lp, "token_logps/value")
    _close(lp_s, tok.lp)
    ignored = labels == -100
    assert (lp[ignored] == 0).all(), "exactly 0 at ignored positions"
    # Against torch.log_softmax itself too.
    direct = torch.log_softmax(logits / temperature, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    _close(lp[~ignored], direct[~ignored])
    _check_stats(stats, tok, ignored, torch.float64)


def _check_stats(stats, tok, ignored, dtype):
    for field in ("entropy", "mean_logit", "log_sum_sq_probs"):
        assert getattr(stats, field).dtype == dtype, field
    assert stats.is_top1.dtype == torch.bool
    tol = F64 if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}  # fp32 outputs: conftest's OUT_TOL
    key = "token_stats/value" + ("" if dtype == torch.float64 else "-fp32")
    _close(stats.entropy, tok.ent, key, **tol)
    _close(stats.mean_logit, tok.mean_logit, key, **tol)
    _close(stats.log_sum_sq_probs, tok.lssp, key, **tol)
    assert torch.equal(stats.is_top1, tok.top1)
    for field in ("entropy", "mean_logit", "log_sum_sq_probs"):
        assert (getattr(stats, field)[ignored] == 0).all(), f"{field} is 0 at ignored positions"
    assert not stats.is_top1[ignored].any()
    for field in ("mean_logit", "log_sum_sq_probs"):
        assert not getattr(stats, field).requires_grad, f"only entropy carries a gradient, not {field}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_token_logps_low_precision_outputs_fp32(dtype):
    # Peaked rows (one logit 5 … 60 above the rest, entropy near 0 next to a log-sum-exp near 75) are where an
    # entropy taken as lse − Σ p·x cancels in fp32; −Σ p·log p does not.
    logits = 3.0 * torch.randn(8, 16, 50)
    peak = torch.randint(0, 50, (8, 16, 1))
    logits.scatter_add_(-1, peak, torch.linspace(5.0, 60.0, 128).view(8, 16, 1))
    logits = logits.to(dtype)
    labels = torch.randint(0, 50, (8, 16))
    labels[0, :2] = -100
    lp, stats = R.token_logps(logits, labels, temperature=0.8, return_stats=True)
    tok = spec_tokens(logits.double(), labels, temperature=0.8)  # bf16/fp16 upcast exactly
    assert lp.dtype == torch.float32
    assert_out_close(lp, tok.lp.detach())
    _check_stats(stats, tok, labels == -100, torch.float32)


def test_token_logps_is_top1_tie_rule():
    # First-argmax rule (§3): the target counts only if ≥ every logit and > every earlier-index logit.
    V = 6
    logits = torch.tensor(
        [
            [0.0, 5.0, 1.0, 5.0, 2.0, 0.0],  # target 1: max, ties only with a later index → True
            [0.0, 5.0, 1.0, 5.0, 2.0, 0.0],  # target 3: ties with an earlier index → False
            [5.0, 5.0, 5.0, 5.0, 5.0, 5.0],  # all equal, target 0 → True
            [5.0, 5.0, 5.0, 5.0, 5.0, 5.0],  # all equal, target 5 → False
            [0.0, 1.0, 2.0, 3.0, 4.0, 9.0],  # unique max at the target → True
            [0.0, 1.0, 2.0, 3.0, 4.0, 9.0],  # not the max → False
        ],
        dtype=torch.float64,
    )
    labels = torch.tensor([1, 3, 0, 5, 5, 2])
    for temperature in (1.0, 0.3):
        _, stats = R.token_logps(logits, labels, temperature=temperature, return_stats=True)
        assert stats.is_top1.tolist() == [True, False, True, False, True, False]
    # Random integer logits: ties everywhere, against the direct rule.
    logits = torch.randint(0, 3, (40, V)).double()
    labels = torch.randint(0, V, (40,))
    _, stats = R.token_logps(logits, labels, return_stats=True)
    assert torch.equal(stats.is_top1, spec_tokens(logits, labels).top1)


def test_token_logps_extreme_logits():
    # Logits at ±1e4 and −inf entries (not at the target): finite log-probs and statistics where the math is.
    V = 9
    logits = 1e4 * torch.randn(8, V, dtype=torch.float64)
    logits[:, 0] = -math.inf
    logits[3] = 0.0  # a uniform row: log-prob −log(V − 1) with the −inf entry excluded
    logits[3, 0] = -math.inf
    # Two top logits 20 apart at the 3e4 scale: entropy ≈ 4e-8, log Σ p² ≈ −3.8e-9, both far below the logits.
    logits[5] = 3e4 + torch.tensor(
        [-math.inf, -1e4, 0.0, 5e3, 17539.3203, 17559.4055, 1e3, 2e3, 3e3], dtype=torch.float64
    )
    labels = torch.randint(1, V, (8,))
    lp, stats = R.token_logps(logits, labels, return_stats=True)
    tok = spec_tokens(logits, labels)
    assert torch.isfinite(lp).all() and torch.isfinite(stats.entropy).all()
    assert torch.isfinite(stats.log_sum_sq_probs).all()
    assert (stats.entropy >= 0).all(), f"negative entropy {stats.entropy.min().item():.3g}"
    # The log-sum-exp of logits this large is itself rounded to one ulp of the largest logit (~7e-12 at 5e4),
    # and every quantity near 0 (the top token's log-prob, a small entropy, log Σ p² ≈ 0) inherits that
    # absolute error: allow 4 such ulps instead of F64's atol.
    finite_max = logits[torch.isfinite(logits)].abs().max().item()
    ext = {"atol": 4 * torch.finfo(torch.float64).eps * finite_max, "rtol": F64["rtol"]}
    _close(lp, tok.lp, "token_logps/value-extreme", **ext)
    _close(lp[3], torch.tensor(-math.log(V - 1), dtype=torch.float64))
    _close(stats.entropy, tok.ent, "token_stats/value-extreme", **ext)
    _close(stats.log_sum_sq_probs, tok.lssp, "token_stats/value-extreme", **ext)
    assert torch.equal(stats.is_top1, tok.top1)
    assert (stats.mean_logit == -math.inf).all()  # the vocabulary mean of a row holding −inf
    # Shift invariance: adding a constant to a row changes nothing but mean_logit.
    shift = 1e3 * torch.randn(8, 1, dtype=torch.float64)
    lp2 = R.token_logps(logits[:, 1:] + shift, labels - 1)
    _close(lp2, R.token_logps(logits[:, 1:], labels - 1), atol=1e-9, rtol=1e-12)  # |logits| ~ 1e4: ulp ≈ 2e-12


def test_token_logps_custom_ignore_index():
    logits = torch.randn(5, 4, 7, dtype=torch.float64)
    labels = torch.randint(0, 7, (5, 4))
    labels[:, 0] = -1
    lp = R.token_logps(logits, labels, ignore_index=-1)
    _close(lp, spec_tokens(logits, labels, ignore_index=-1).lp)
    assert (lp[:, 0] == 0).all()
    labels[0, 1] = -100  # no longer the ignore index: out of range
    with pytest.raises(ValueError, match=r"labels must be in \[0, 7\)"):
        R.token_logps(logits, labels, ignore_index=-1)


@pytest.mark.parametrize("temperature", [1.0, 0.6], ids=lambda t: f"T{t}")
def test_token_logps_gradients(temperature):
    # §6: ∂lp/∂z_v = (1[v = y] − p_v)/T; entropy: ∂H/∂z_v = −p_v (log p_v + H)/T; zero rows where ignored.
    N, V = 12, 17
    logits = (3.0 * torch.randn(N, V, dtype=torch.float64)).requires_grad_(True)
    labels = torch.randint(0, V, (N,))
    labels[[0, 5]] = -100
    lp, stats = R.token_logps(logits, labels, temperature=temperature, return_stats=True)
    g_lp = torch.randn(N, dtype=torch.float64)
    g_h = torch.randn(N, dtype=torch.float64)
    (d_lp,) = torch.autograd.grad(lp, logits, g_lp, retain_graph=True)
    (d_h,) = torch.autograd.grad(stats.entropy, logits, g_h)
    tok = spec_tokens(logits, labels, temperature=temperature)
    onehot = torch.nn.functional.one_hot(tok.y, V).double()
    valid = tok.valid.double().unsqueeze(-1)
    exp_lp = valid * g_lp.unsqueeze(-1) * (onehot - tok.p) / temperature
    logp = torch.log_softmax(logits.detach() / temperature, -1)
    exp_h = -valid * g_h.unsqueeze(-1) * tok.p * (logp + tok.ent.unsqueeze(-1)) / temperature
    _close(d_lp, exp_lp, "token_logps/grad")
    _close(d_h, exp_h, "token_stats/grad")
    assert (d_lp[[0, 5]] == 0).all() and (d_h[[0, 5]] == 0).all()


def test_token_logps_against_trl_chunked_logprob():
    # TRL's own per-token kernel (torch path on the CPU, fp32): logits = hidden @ I, exact in fp32.
    from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS, ChunkedLogProbFunction

    N, V = 20, 37
    logits = 4.0 * torch.randn(N, V)
    logits[:6] = torch.randint(0, 3, (6, V)).float()  # ties for is_top1
    labels = torch.randint(0, V, (N,))
    trl_lp, trl_ent, trl_lssp, trl_mean, trl_top1 = ChunkedLogProbFunction.apply(
        logits, torch.eye(V), None, labels, 1.0, V, None, 1.0, OPTIONAL_OUTPUTS
    )
    lp, stats = R.token_logps(logits, labels, return_stats=True)
    assert_out_close(lp, trl_lp)
    assert_out_close(stats.entropy, trl_ent)
    assert_out_close(stats.log_sum_sq_probs, trl_lssp)
    assert_out_close(stats.mean_logit, trl_mean)
    assert torch.equal(stats.is_top1, trl_top1)


# ------------------------------------------------------------------------------------------------------------------
# Sequence sums and LD-DPO (§3, §3.1)


def ld_batch(B: int, T: int, V: int = 50):
    """Labels [2B, T] whose pairs cover: chosen longer, rejected longer, equal, one side empty, and a hole."""
    labels = random_labels(2 * B, T, V)
    labels[0] = -100  # chosen 0 has no completion token: shared = 0, its rejected is all tail
    labels[B + 1, 3:] = -100
    labels[1, 1:] = torch.randint(0, V, (T - 1,))  # chosen 1 longer than rejected 1
    return labels


def pack(values: torch.Tensor, labels: torch.Tensor, keep: list[int]):
    """Packs the first keep[r] positions of each row: (values [N], labels [N], cu_seqlens [S+1] int32)."""
    vals = torch.cat([values[r, :k] for r, k in enumerate(keep)])
    labs = torch.cat([labels[r, :k] for r, k in enumerate(keep)])
    cu = torch.tensor([0] + list(torch.tensor(keep).cumsum(0)), dtype=torch.int32)
    return vals, labs, cu


def keep_lengths(labels: torch.Tensor) -> list[int]:
    """A random packed length per row that keeps all its scored tokens (0 for a row without any)."""
    keep = []
    T = labels.shape[1]
    for row in labels:
        scored = (row != -100).nonzero()
        if len(scored) == 0:
            keep.append(0)
        else:
            last = int(scored.max()) + 1
            keep.append(int(torch.randint(last, T + 1, ())))
    return keep


@pytest.mark.parametrize("ld_alpha", [None, 0.0, 0.3, 1.0], ids=lambda a: f"alpha{a}")
def test_sequence_logps_padded_and_packed(ld_alpha):
    B, T, V = 4, 10, 50
    S = 2 * B
    labels = ld_batch(B, T, V)
    lp = -5.0 * torch.rand(S, T, dtype=torch.float64)  # garbage at ignored positions must not count
    stats = R.TokenStats(
        entropy=3.0 * torch.rand(S, T, dtype=torch.float64),
        mean_logit=torch.randn(S, T, dtype=torch.float64),
        is_top1=torch.rand(S, T) < 0.5,
        log_sum_sq_probs=-torch.rand(S, T, dtype=torch.float64),
    )
    mask = labels != -100
    w = ld_token_weights(mask, ld_alpha)
    m = mask.double()
    expected = {
        "logps": (lp * w).sum(1),
        "raw_logps": (lp * m).sum(1),
        "entropy": (stats.entropy * m).sum(1),
        "mean_logit": (stats.mean_logit * m).sum(1),
        "is_top1": (stats.is_top1 & mask).double().sum(1),
        "log_sum_sq_probs": (stats.log_sum_sq_probs * m).sum(1),
    }
    padded = R.sequence_logps(lp, labels, ld_alpha=ld_alpha, token_stats=stats)
    by_mask = R.sequence_logps(lp, mask, ld_alpha=ld_alpha)
    keep = keep_lengths(labels)
    packed_lp, packed_labels, cu = pack(lp, labels, keep)
    packed_stats = R.TokenStats(*(pack(t, labels, keep)[0] for t in stats))
    packed = R.sequence_logps(packed_lp, packed_labels, ld_alpha=ld_alpha, cu_seqlens=cu, token_stats=packed_stats)
    packed64 = R.sequence_logps(packed_lp, packed_labels, ld_alpha=ld_alpha, cu_seqlens=cu.long())

    for out in (padded, by_mask, packed, packed64):
        _close(out.logps, expected["logps"], "sequence_logps/value")
        _close(out.raw_logps, expected["raw_logps"], "sequence_logps/value")
        assert out.n_tokens.dtype == torch.int64 and torch.equal(out.n_tokens, mask.sum(1))
    for out in (padded, packed):
        for field in ("entropy", "mean_logit", "is_top1", "log_sum_sq_probs"):
            _close(getattr(out.stats, field), expected[field], "sequence_logps/value")
        assert torch.equal(out.stats.n_tokens, mask.sum(1))
    _close(packed.logps, padded.logps)  # padded and packed agree
    if ld_alpha in (None, 1.0):
        _close(padded.logps, padded.raw_logps)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("ld_alpha", [None, 0.0, 0.3], ids=lambda a: f"alpha{a}")
def test_sequence_logps_gradients(ld_alpha, layout):
    # §3.1 / §6: ∂/∂lp[t] = m_t·(g_weighted[s]·w_t + g_raw[s]); entropy sums carry g_entropy[s] to each token.
    B, T = 3, 8
    S = 2 * B
    labels = ld_batch(B, T)
    lp = (-5.0 * torch.rand(S, T, dtype=torch.float64)).requires_grad_(True)
    ent = (3.0 * torch.rand(S, T, dtype=torch.float64)).requires_grad_(True)
    zeros = torch.zeros(S, T, dtype=torch.float64)
    if layout == "padded":
        stats = R.TokenStats(ent, zeros, torch.zeros(S, T, dtype=torch.bool), zeros)
        out = R.sequence_logps(lp, labels, ld_alpha=ld_alpha, token_stats=stats)
    else:
        keep = [T] * S
        p_lp, p_labels, cu = pack(lp, labels, keep)
        p_ent = pack(ent, labels, keep)[0]
        z = torch.zeros_like(p_lp)
        stats = R.TokenStats(p_ent, z, torch.zeros_like(p_labels, dtype=torch.bool), z)
        out = R.sequence_logps(p_lp, p_labels, ld_alpha=ld_alpha, cu_seqlens=cu, token_stats=stats)
    gw, graw, gent = (torch.randn(S, dtype=torch.float64) for _ in range(3))
    d_lp, d_ent = torch.autograd.grad(
        (out.logps * gw).sum() + (out.raw_logps * graw).sum() + (out.stats.entropy * gent).sum(), (lp, ent)
    )
    mask = labels != -100
    w = ld_token_weights(mask, ld_alpha)
    _close(d_lp, gw.unsqueeze(1) * w + graw.unsqueeze(1) * mask, "sequence_logps/grad")
    _close(d_ent, gent.unsqueeze(1) * mask, "sequence_logps/grad")


# ------------------------------------------------------------------------------------------------------------------
# Metrics from sequence statistics (§7)


def test_stats_metrics():
    B = 5
    pc, pr, rc, rr, _, _ = make_pairs(B, "moderate", 0.1)
    n = torch.randint(0, 30, (2 * B,))
    n[1] = 0
    stats = R.SequenceStats(
        entropy=3.0 * torch.rand(2 * B, dtype=torch.float64) * n,
        mean_logit=torch.randn(2 * B, dtype=torch.float64) * n,
        is_top1=torch.floor(torch.rand(2 * B, dtype=torch.float64) * (n + 1)),
        log_sum_sq_probs=-torch.rand(2 * B, dtype=torch.float64) * n,
        n_tokens=n,
    )
    out = R.dpo_loss(pc, pr, rc, rr, sequence_stats=stats)
    expected = {**spec_reward_metrics(pc, pr, rc, rr, 0.1), **spec_stats_metrics(*stats[:3], n)}
    check_metrics(out.metrics, expected)
    # No tokens at all: every token-weighted metric is 0 (not 0/0).
    empty = R.SequenceStats(*(torch.zeros(2 * B, dtype=torch.float64) for _ in range(4)), torch.zeros(2 * B).long())
    out = R.dpo_loss(pc, pr, rc, rr, sequence_stats=empty)
    check_metrics(out.metrics, {k: 0.0 for k in L.STATS_METRICS})


# ------------------------------------------------------------------------------------------------------------------
# End to end from logits (§3 → §1 → §7), against the spec and against TRL


def logits_batch(B: int, T: int, V: int, *, empty_chosen: bool = False):
    """Aligned logits [2B, T, V] and labels [2B, T] (the shifted completion labels TRL scores)."""
    labels = random_labels(2 * B, T, V, hole=False)
    labels[:, 0] = -100  # prompt ≥ 1 token, as in TRL's batches
    labels[B, 1:] = torch.randint(0, V, (T - 1,))  # one full-length row
    if empty_chosen:
        labels[1] = -100
    logits = 3.0 * torch.randn(2 * B, T, V, dtype=torch.float64)
    return logits, labels


def spec_from_logits(logits, labels, rc, rr, *, names, weights=None, beta=0.1, eps=0.0, tau=0.05,
                     fdiv="reverse_kl", acoef=0.5, ld_alpha=None, use_weighting=False, temperature=1.0):  # fmt: skip
    """Spec pipeline: per-token (§3) → LD sums (§3.1) → WPO (§5) → losses (§1, §2) → metrics (§7), and the
    closed-form gradient with respect to the logits (§6)."""
    tok = spec_tokens(logits, labels, temperature=temperature)
    mask = tok.valid
    S = labels.shape[0]
    B = S // 2
    lp = tok.lp.detach()
    w_ld = ld_token_weights(mask, ld_alpha)
    logp = (lp * w_ld).sum(1)
    n = mask.sum(1)
    pc, pr = logp[:B], logp[B:]
    pair_w = None
    if use_weighting:
        seq_w = torch.exp(((lp - tok.lssp) * mask).sum(1) / n.double().clamp(min=1))
        pair_w = seq_w[:B] * seq_w[B:]
    losses, loss, g = spec_mix(
        names, weights, pc, pr, rc, rr, beta=beta, eps=eps, tau=tau, fdiv=fdiv, acoef=acoef, nc=n[:B], nr=n[B:],
        sft_sum=(lp * mask)[:B].sum(1), sft_count=n[:B], w=pair_w,
    )  # fmt: skip
    g_seq = torch.cat([g["pc"], g["pr"]])
    g_tok = w_ld * g_seq.unsqueeze(1)
    g_tok[:B] += mask[:B] * g["sft"].unsqueeze(1)  # sft reads the plain chosen token log-probs
    onehot = torch.nn.functional.one_hot(tok.y, logits.shape[-1]).double()
    d_logits = g_tok.unsqueeze(-1) * (onehot - tok.p) / temperature
    metrics = {
        **spec_reward_metrics(pc, pr, rc, rr, beta),
        **spec_stats_metrics((tok.ent * mask).sum(1), (tok.mean_logit * mask).sum(1), tok.top1.sum(1), n),
    }
    return SimpleNamespace(loss=loss, losses=losses, pc=pc, pr=pr, d_logits=d_logits, metrics=metrics, logp=logp)


E2E = [
    pytest.param(dict(names=["sigmoid"]), id="sigmoid"),
    pytest.param(dict(names=["ipo"], ld_alpha=0.3), id="ipo-ld0.3"),
    pytest.param(dict(names=["sigmoid", "bco_pair", "sft"], weights=[0.8, 0.2, 1.0], use_weighting=True), id="mpo-wpo"),
    pytest.param(dict(names=["sft"], ld_alpha=0.0), id="sft-ld0"),
    pytest.param(
        dict(names=["hinge", "sft"], weights=[1.0, 0.5], use_weighting=True, ld_alpha=0.5), id="hinge+sft-wpo"
    ),
    pytest.param(dict(names=["sigmoid_norm"], fdiv="js_divergence", temperature=0.7), id="signorm-js-T0.7"),
    pytest.param(dict(names=["aot_unpaired", "exo_pair"], eps=0.2, ld_alpha=1.0), id="aot_unpaired+exo-ld1"),
]


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("cfg", E2E)
def test_from_logits(cfg, layout):
    B, T, V = 4, 9, 23
    logits, labels = logits_batch(B, T, V, empty_chosen=True)
    rc = -(20.0 + 50.0 * torch.rand(B, dtype=torch.float64))
    rr = -(20.0 + 50.0 * torch.rand(B, dtype=torch.float64))
    exp = spec_from_logits(logits, labels, rc, rr, **cfg)
    options = dict(
        loss_type=cfg["names"],
        loss_weights=cfg.get("weights"),
        beta=0.1,
        label_smoothing=cfg.get("eps", 0.0),
        f_divergence_type=cfg.get("fdiv", "reverse_kl"),
        ld_alpha=cfg.get("ld_alpha"),
        use_weighting=cfg.get("use_weighting", False),
        temperature=cfg.get("temperature", 1.0),
        return_stats=True,
    )
    x = logits.clone().requires_grad_(True)
    if layout == "padded":
        out = R.dpo_loss_from_logits(x, labels, rc, rr, **options)
        (d_logits,) = torch.autograd.grad(out.loss, x)
    else:
        keep = keep_lengths(labels)
        packed_logits = torch.cat([x[r, :k] for r, k in enumerate(keep)])
        _, packed_labels, cu = pack(logits[..., 0], labels, keep)
        out = R.dpo_loss_from_logits(packed_logits, packed_labels, rc, rr, cu_seqlens=cu, **options)
        (d_logits,) = torch.autograd.grad(out.loss, x)
    key = "from_logits"
    _close(out.loss, exp.loss, f"{key}/value")
    _close(out.losses, exp.losses, f"{key}/value")
    _close(out.chosen_logps.detach(), exp.pc, f"{key}/value")
    _close(out.rejected_logps.detach(), exp.pr, f"{key}/value")
    _close(d_logits, exp.d_logits, f"{key}/grad")
    check_metrics(out.metrics, exp.metrics)


def test_from_logits_reference_paths():
    # ref_logits: the reference goes through the same per-token and LD path, without gradient;
    # reference_free: rc = rr = 0.
    B, T, V = 3, 8, 15
    logits, labels = logits_batch(B, T, V)
    ref_logits = 3.0 * torch.randn_like(logits)
    ref_logp = (spec_tokens(ref_logits, labels).lp * ld_token_weights(labels != -100, 0.4)).sum(1)
    x = logits.clone().requires_grad_(True)
    ref = ref_logits.clone().requires_grad_(True)
    out = R.dpo_loss_from_logits(x, labels, ref_logits=ref, ld_alpha=0.4, loss_type="sigmoid")
    exp = spec_from_logits(logits, labels, ref_logp[:B], ref_logp[B:], names=["sigmoid"], ld_alpha=0.4)
    _close(out.loss, exp.loss)
    (d_logits,) = torch.autograd.grad(out.loss, x)
    _close(d_logits, exp.d_logits)
    assert ref.grad is None
    zeros = torch.zeros(B, dtype=torch.float64)
    out = R.dpo_loss_from_logits(logits, labels, reference_free=True, loss_type="sigmoid")
    _close(out.loss, spec_from_logits(logits, labels, zeros, zeros, names=["sigmoid"]).loss)


# --- TRL 1.16 as a second oracle: DPOTrainer._compute_loss on a stand-in trainer ---------------------------------


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    @staticmethod
    def gather(x):
        return x


def trl_compute_loss(logits, labels, rc, rr, *, names, weights=None, beta=0.1, eps=0.0, tau=0.05,
                     fdiv="reverse_kl", acoef=0.5, ld_alpha=None, use_weighting=False):  # fmt: skip
    """TRL's own loss code on per-token outputs computed from `logits` (float64): returns (loss, metrics).

    The stand-in model returns what TRL's fused LM head would (log_probs 0 outside the shift mask, entropy,
    mean_logits, is_top1, log_sum_sq_probs); `completion_mask` is rebuilt unshifted with position 0 a prompt token.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    tok = spec_tokens(logits, labels)
    S, T = labels.shape
    shift_mask = (labels != -100).long()
    completion_mask = torch.cat([torch.zeros(S, 1, dtype=torch.long), shift_mask], dim=1)
    input_ids = torch.cat([torch.zeros(S, 1, dtype=torch.long), labels.clamp(min=0)], dim=1)
    model_out = SimpleNamespace(
        log_probs=tok.lp, entropy=tok.ent, mean_logits=tok.mean_logit, is_top1=tok.top1, log_sum_sq_probs=tok.lssp
    )
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        ld_alpha=ld_alpha,
        precompute_ref_logps=True,
        f_divergence_type=fdiv,
        f_alpha_divergence_coef=acoef,
        loss_types=list(names),
        loss_weights=list(weights) if weights is not None else [1.0] * len(names),
        beta=beta,
        label_smoothing=eps,
        args=SimpleNamespace(discopop_tau=tau),
        use_weighting=use_weighting,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = DPOTrainer._compute_loss(trainer, lambda **kwargs: model_out, inputs, False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
    return loss, metrics


def near_reference(logits, labels):
    """Reference log-probs within a few nats of the policy's, so log-ratios stay moderate (forward_kl's exp(−x) and
    discopop's exp(−z) overflow otherwise, where TRL returns NaN: §9)."""
    B = labels.shape[0] // 2
    logp = spec_tokens(logits, labels).lp.detach().sum(1) + 2.0 * torch.randn(2 * B, dtype=torch.float64)
    return logp[:B], logp[B:]


TRL_CASES = [pytest.param(dict(names=[n]), id=n) for n in ALL_LOSSES if n not in ("exo_pair", "robust")] + [
    pytest.param(dict(names=["robust"], eps=0.2), id="robust-eps0.2"),
    pytest.param(dict(names=["aot"], eps=0.1), id="aot-eps0.1"),
    pytest.param(dict(names=["sigmoid", "bco_pair", "sft"], weights=[0.8, 0.2, 1.0]), id="mpo"),
    pytest.param(dict(names=["ipo"], fdiv="js_divergence"), id="ipo-js"),
    pytest.param(dict(names=["sigmoid_norm", "discopop"], fdiv="forward_kl", tau=0.3), id="signorm+discopop-fkl"),
    pytest.param(dict(names=["sigmoid", "ipo"], ld_alpha=0.3), id="sigmoid+ipo-ld0.3"),
    pytest.param(dict(names=["sigmoid"], use_weighting=True), id="sigmoid-wpo"),
    pytest.param(
        dict(names=["bco_pair", "apo_down"], weights=[1.0, 0.4], use_weighting=True, ld_alpha=0.0),
        id="bco+apo_down-wpo-ld0",
    ),  # fmt: skip
]


@pytest.mark.parametrize("cfg", TRL_CASES)
def test_against_trl(cfg):
    B, T, V = 4, 9, 23
    logits, labels = logits_batch(B, T, V)
    rc, rr = near_reference(logits, labels)
    x_trl = logits.clone().requires_grad_(True)
    trl_loss, trl_metrics = trl_compute_loss(x_trl, labels, rc, rr, **cfg)
    (trl_grad,) = torch.autograd.grad(trl_loss, x_trl)
    x = logits.clone().requires_grad_(True)
    out = R.dpo_loss_from_logits(
        x,
        labels,
        rc,
        rr,
        loss_type=cfg["names"],
        loss_weights=cfg.get("weights"),
        beta=0.1,
        label_smoothing=cfg.get("eps", 0.0),
        discopop_tau=cfg.get("tau", 0.05),
        f_divergence_type=cfg.get("fdiv", "reverse_kl"),
        ld_alpha=cfg.get("ld_alpha"),
        use_weighting=cfg.get("use_weighting", False),
        return_stats=True,
    )
    (grad,) = torch.autograd.grad(out.loss, x)
    _close(out.loss, trl_loss, "trl/value")
    _close(grad, trl_grad, "trl/grad")
    # TRL takes these two as fp32 means whatever the input dtype (`.float()`; an integer count / integer count).
    check_metrics(out.metrics, trl_metrics, fp32_keys=("rewards/accuracies", "mean_token_accuracy"))
    assert set(trl_metrics) == set(L.REWARD_METRICS) | set(L.STATS_METRICS)


def test_exo_pair_against_trl():
    # TRL builds ε as an fp32 scalar, so log(1−ε) and log ε are fp32-rounded even for float64 inputs (§9): ~1e-7
    # relative, hence conftest's fp32 output tolerance here instead of F64.
    B, T, V = 4, 9, 23
    logits, labels = logits_batch(B, T, V)
    rc, rr = near_reference(logits, labels)
    trl_loss, trl_metrics = trl_compute_loss(logits, labels, rc, rr, names=["exo_pair"], eps=0.2)
    out = R.dpo_loss_from_logits(logits, labels, rc, rr, loss_type="exo_pair", label_smoothing=0.2)
    assert_out_close(out.loss, trl_loss)


# ------------------------------------------------------------------------------------------------------------------
# gradcheck in float64 on tiny shapes


def _tiny_pairs(B=3, beta=0.5):
    # Log-ratios of order 1, distinct (aot sorts them) and away from hinge's kink at z = 1.
    pc, pr, rc, rr, nc, nr = make_pairs(B, "moderate", beta, scale=1.0)
    z = beta * ((pc - rc) - (pr - rr))
    pc = pc + torch.where((z - 1.0).abs() < 0.05, 0.2 / beta, 0.0)
    return pc, pr, rc, rr, nc, nr


GRADCHECK_CASES = [pytest.param(dict(loss_type=n), id=n) for n in ALL_LOSSES] + [
    pytest.param(dict(loss_type="ipo", f_divergence_type="js_divergence"), id="ipo-js"),
    pytest.param(dict(loss_type="sigmoid_norm", f_divergence_type="forward_kl"), id="signorm-fkl"),
    pytest.param(
        dict(loss_type="robust", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
        id="robust-alpha0.3",
    ),  # fmt: skip
    pytest.param(dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]), id="mpo"),
]


@pytest.mark.parametrize("kw", GRADCHECK_CASES)
def test_gradcheck_dpo_loss(kw):
    pc, pr, rc, rr, nc, nr = _tiny_pairs()
    eps = 0.2 if kw["loss_type"] in ("exo_pair", "robust") else 0.0

    def fn(pc, pr, rc, rr):
        out = R.dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=eps, chosen_lengths=nc, rejected_lengths=nr, **kw)
        return out.loss, out.losses

    assert torch.autograd.gradcheck(fn, tuple(leafs(pc, pr, rc, rr)))


@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=lambda t: f"T{t}")
def test_gradcheck_token_logps(temperature):
    logits = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (3, 4))
    labels[0, 0] = labels[2, 3] = -100

    def fn(logits):
        lp, stats = R.token_logps(logits, labels, temperature=temperature, return_stats=True)
        return lp, stats.entropy

    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gradcheck_sequence_logps(layout):
    B, T = 2, 5
    labels = ld_batch(B, T, V=9)
    lp = -torch.rand(2 * B, T, dtype=torch.float64, requires_grad=True)
    ent = torch.rand(2 * B, T, dtype=torch.float64, requires_grad=True)

    def fn(lp, ent):
        z = torch.zeros_like(lp)
        stats = R.TokenStats(ent, z, torch.zeros_like(lp, dtype=torch.bool), z)
        if layout == "padded":
            out = R.sequence_logps(lp, labels, ld_alpha=0.3, token_stats=stats)
        else:
            cu = torch.arange(2 * B + 1) * T
            flat = R.TokenStats(*(t.reshape(-1) for t in stats))
            out = R.sequence_logps(lp.reshape(-1), labels.reshape(-1), ld_alpha=0.3, cu_seqlens=cu, token_stats=flat)
        return out.logps, out.raw_logps, out.stats.entropy

    assert torch.autograd.gradcheck(fn, (lp, ent))


def test_gradcheck_from_logits():
    logits, labels = logits_batch(2, 5, 6)
    logits.requires_grad_(True)
    rc, rr = -torch.rand(2, 2, dtype=torch.float64) * 10

    def fn(x):
        out = R.dpo_loss_from_logits(
            x, labels, rc, rr, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], ld_alpha=0.3
        )  # no WPO here: its weights are constants by design (§5), which finite differences do not see
        return out.loss

    assert torch.autograd.gradcheck(fn, (logits,))


# ------------------------------------------------------------------------------------------------------------------
# Bad input: the exception and a message that names what is wrong


def _pairs4(B=3, dtype=torch.float64):
    return [torch.randn(B, dtype=dtype) for _ in range(4)]


def _lengths(B=3):
    return dict(chosen_lengths=torch.full((B,), 5), rejected_lengths=torch.full((B,), 5))


def _seq_inputs(S=3, T=4):
    return torch.randn(S, T, dtype=torch.float64), torch.randint(0, 5, (S, T))


def _packed(cu):
    return R.sequence_logps(torch.randn(6, dtype=torch.float64), torch.randint(0, 5, (6,)), cu_seqlens=cu)


BAD = [
    ("unknown-loss", lambda: R.dpo_loss(*_pairs4(), loss_type="simpo"), ValueError, r"unknown loss_type 'simpo'"),
    ("unknown-loss-in-list", lambda: R.dpo_loss(*_pairs4(), loss_type=["sigmoid", "cpo"]), ValueError,
     r"unknown loss_type 'cpo'"),
    ("unknown-fdiv", lambda: R.dpo_loss(*_pairs4(), f_divergence_type="kl"), ValueError,
     r"unknown f_divergence_type 'kl'.*reverse_kl.*forward_kl.*js_divergence.*alpha_divergence"),
    ("weights-length", lambda: R.dpo_loss(*_pairs4(), loss_type=["sigmoid", "sft"], loss_weights=[1.0], **_lengths()),
     ValueError, r"loss_weights has 1 entries but loss_type has 2"),
    ("exo-eps0", lambda: R.dpo_loss(*_pairs4(), loss_type="exo_pair"), ValueError, r"exo_pair.*label_smoothing"),
    ("robust-eps0.5", lambda: R.dpo_loss(*_pairs4(), loss_type="robust", label_smoothing=0.5), ValueError,
     r"robust.*label_smoothing.*\[0, 0\.5\)"),
    ("robust-eps0.7", lambda: R.dpo_loss(*_pairs4(), loss_type="robust", label_smoothing=0.7), ValueError,
     r"robust.*label_smoothing"),
    ("robust-eps-neg", lambda: R.dpo_loss(*_pairs4(), loss_type="robust", label_smoothing=-0.1), ValueError,
     r"label_smoothing"),
    ("beta0", lambda: R.dpo_loss(*_pairs4(), beta=0.0), ValueError, r"beta must be .*> 0"),
    ("beta-neg", lambda: R.dpo_loss(*_pairs4(), beta=-0.1), ValueError, r"beta must be .*> 0"),
    ("beta-nan", lambda: R.dpo_loss(*_pairs4(), beta=float("nan")), ValueError, r"beta"),
    ("tau0", lambda: R.dpo_loss(*_pairs4(), loss_type="discopop", discopop_tau=0.0), ValueError, r"discopop_tau"),
    ("ld-alpha-neg", lambda: R.sequence_logps(*_seq_inputs(4), ld_alpha=-0.1), ValueError, r"ld_alpha.*\[0, 1\]"),
    ("ld-alpha-1.5", lambda: R.sequence_logps(*_seq_inputs(4), ld_alpha=1.5), ValueError, r"ld_alpha.*\[0, 1\]"),
    ("ld-alpha-3-from-logits",
     lambda: R.dpo_loss_from_logits(torch.randn(4, 3, 5, dtype=torch.float64), torch.randint(0, 5, (4, 3)),
                                    *_pairs4(2)[:2], ld_alpha=3.0),
     ValueError, r"ld_alpha.*\[0, 1\]"),
    ("aot-wpo", lambda: R.dpo_loss(*_pairs4(), loss_type="aot", wpo_weights=torch.ones(6, dtype=torch.float64)),
     ValueError, r"WPO.*aot"),
    ("aot_unpaired-wpo-mix",
     lambda: R.dpo_loss(*_pairs4(), loss_type=["sigmoid", "aot_unpaired"], wpo_weights=torch.ones(6,
                        dtype=torch.float64)),
     ValueError, r"WPO.*aot_unpaired"),
    ("aot-use-weighting",
     lambda: R.dpo_loss_from_logits(torch.randn(4, 3, 5, dtype=torch.float64), torch.randint(0, 5, (4, 3)),
                                    *_pairs4(2)[:2], loss_type="aot", use_weighting=True),
     ValueError, r"WPO.*aot"),
    ("wpo-wrong-shape", lambda: R.dpo_loss(*_pairs4(), wpo_weights=torch.ones(3, dtype=torch.float64)), ValueError,
     r"wpo_weights must have shape \[6\]"),
    ("shape-mismatch", lambda: R.dpo_loss(*_pairs4()[:3], torch.randn(4, dtype=torch.float64)), ValueError,
     r"shape"),
    ("shape-2d", lambda: R.dpo_loss(*(t.view(3, 1) for t in _pairs4())), ValueError, r"1-D"),
    ("dtype-integer", lambda: R.dpo_loss(*_pairs4()[:3], torch.zeros(3, dtype=torch.long)), TypeError,
     r"ref_rejected_logps must be a floating-point tensor"),
    ("labels-float", lambda: R.token_logps(torch.randn(3, 5), torch.zeros(3)), TypeError,
     r"labels must be an integer tensor"),
    ("labels-V", lambda: R.token_logps(torch.randn(3, 5), torch.tensor([0, 5, 1])), ValueError,
     r"labels must be in \[0, 5\).*\[5\]"),
    ("labels-minus1", lambda: R.token_logps(torch.randn(3, 5), torch.tensor([0, -1, 1])), ValueError,
     r"labels must be in \[0, 5\).*\[-1\]"),
    ("labels-minus101", lambda: R.token_logps(torch.randn(3, 5), torch.tensor([-101, -100, 1])), ValueError,
     r"labels must be in \[0, 5\)"),
    ("labels-shape", lambda: R.token_logps(torch.randn(3, 5), torch.zeros(4, dtype=torch.long)), ValueError,
     r"labels shape"),
    ("temperature0", lambda: R.token_logps(torch.randn(3, 5), torch.zeros(3, dtype=torch.long), temperature=0.0),
     ValueError, r"temperature"),
    ("ld-odd-rows", lambda: R.sequence_logps(*_seq_inputs(3), ld_alpha=0.5), ValueError, r"even"),
    ("ld-odd-rows-packed",
     lambda: R.sequence_logps(torch.randn(6, dtype=torch.float64), torch.randint(0, 5, (6,)), ld_alpha=0.5,
                              cu_seqlens=torch.tensor([0, 2, 4, 6])),
     ValueError, r"even"),
    ("from-logits-odd-rows",
     lambda: R.dpo_loss_from_logits(torch.randn(3, 4, 5, dtype=torch.float64), torch.randint(0, 5, (3, 4)),
                                    *_pairs4(1)[:2]),
     ValueError, r"even"),
    ("cu-decreasing", lambda: _packed(torch.tensor([0, 4, 2, 6])), ValueError, r"cu_seqlens must be non-decreasing"),
    ("cu-end-short", lambda: _packed(torch.tensor([0, 2, 5])), ValueError, r"cu_seqlens must end at .*N = 6"),
    ("cu-end-long", lambda: _packed(torch.tensor([0, 2, 7])), ValueError, r"cu_seqlens must end at .*N = 6"),
    ("cu-start", lambda: _packed(torch.tensor([1, 2, 6])), ValueError, r"cu_seqlens must start at 0"),
    ("cu-float", lambda: _packed(torch.tensor([0.0, 2.0, 6.0])), TypeError, r"cu_seqlens"),
    ("ipo-no-lengths", lambda: R.dpo_loss(*_pairs4(), loss_type="ipo"), ValueError,
     r"ipo.*chosen_lengths and rejected_lengths"),
    ("signorm-one-length", lambda: R.dpo_loss(*_pairs4(), loss_type="sigmoid_norm",
                                              chosen_lengths=torch.ones(3, dtype=torch.long)),
     ValueError, r"sigmoid_norm.*rejected_lengths"),
    ("sft-no-count", lambda: R.dpo_loss(*_pairs4(), loss_type="sft"), ValueError, r"sft.*chosen_token_count"),
    ("lengths-wrong-shape", lambda: R.dpo_loss(*_pairs4(), loss_type="ipo", chosen_lengths=torch.ones(4),
                                               rejected_lengths=torch.ones(3)),
     ValueError, r"chosen_lengths must have shape \[3\]"),
]  # fmt: skip


@pytest.mark.parametrize("call,exc,match", [pytest.param(c, e, m, id=i) for i, c, e, m in BAD])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_unknown_loss_message_lists_valid_types():
    with pytest.raises(ValueError, match="unknown loss_type") as info:
        R.dpo_loss(*_pairs4(), loss_type="cpo")
    missing = [name for name in L.LOSS_TYPES if name not in str(info.value)]
    assert not missing, f"message does not list {missing}: {info.value}"


def test_dpo_loss_promotes_mixed_dtypes():
    """Log-prob tensors of different float dtypes are promoted (exactly) rather than refused: an fp32 reference
    beside a float64 policy gives the all-float64 answer on the same values."""
    pc, pr, rc = _pairs4()[:3]
    rr32 = torch.randn(3, dtype=torch.float32)
    mixed = R.dpo_loss(pc, pr, rc, rr32)
    same = R.dpo_loss(pc, pr, rc, rr32.double())
    assert mixed.loss.dtype == torch.float64
    torch.testing.assert_close(mixed.loss, same.loss, atol=0, rtol=0)
