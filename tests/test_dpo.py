"""ops/dpo.py (dpo_fwd) against the float64 reference: losses, loss, rewards and metrics, and the
analytic gradients against autograd through reference.dpo_loss."""

import pytest
import torch
from conftest import DEVICE, assert_grad_close, assert_out_close

from dpo_kernels import losses as L
from dpo_kernels import reference as R
from dpo_kernels.ops.dpo import MAX_TERMS, dpo_fwd

pytestmark = pytest.mark.triton

# label_smoothing each loss type accepts and that exercises its ε terms (exo_pair needs ε > 0).
EPS = {"exo_pair": 0.1, "robust": 0.2, "aot": 0.1, "aot_unpaired": 0.1}


def make_inputs(B: int, margin_scale: float = 20.0) -> dict[str, torch.Tensor]:
    """fp32 per-sequence inputs (the reference sees exactly the same values): reference log-probs
    of a few hundred nats, log-ratios N(0, margin_scale), lengths 0..30 (0 exercises the clamp), an
    sft sum and count of its own."""
    rc = -torch.rand(B) * 300 - 5
    rr = -torch.rand(B) * 300 - 5
    return {
        "pc": rc + margin_scale * torch.randn(B),
        "pr": rr + margin_scale * torch.randn(B),
        "rc": rc,
        "rr": rr,
        "chosen_lengths": torch.randint(0, 31, (B,)),
        "rejected_lengths": torch.randint(0, 31, (B,)),
        "sft_sum": -torch.rand(B) * 200,
        "sft_count": torch.randint(0, 200, (B,)),
    }


def run_kernel(x: dict, config: L.LossConfig, *, pair_weights=None, with_sft_sum=True):
    t = {k: v.to(DEVICE) for k, v in x.items()}
    return dpo_fwd(
        t["pc"], t["pr"], t["rc"], t["rr"],
        config=config,
        chosen_lengths=t["chosen_lengths"],
        rejected_lengths=t["rejected_lengths"],
        pair_weights=None if pair_weights is None else pair_weights.to(DEVICE),
        sft_sum=t["sft_sum"] if with_sft_sum else None,
        sft_count=t["sft_count"],
    )  # fmt: skip


def run_reference(x: dict, options: dict, *, pair_weights=None, with_sft_sum=True):
    """reference.dpo_loss in float64, and autograd's gradient of its loss w.r.t. pc, pr, rc, rr and
    sft_sum."""
    leaves = {k: x[k].double().requires_grad_() for k in ("pc", "pr", "rc", "rr", "sft_sum")}
    B = x["pc"].shape[0]
    wpo = None
    if pair_weights is not None:  # the reference takes per-sequence weights; ω = w_chosen · 1
        wpo = torch.cat([pair_weights.double(), torch.ones(B, dtype=torch.float64)])
    out = R.dpo_loss(
        leaves["pc"], leaves["pr"], leaves["rc"], leaves["rr"],
        **options,
        chosen_lengths=x["chosen_lengths"],
        rejected_lengths=x["rejected_lengths"],
        wpo_weights=wpo,
        chosen_token_logp_sum=leaves["sft_sum"] if with_sft_sum else None,
        chosen_token_count=x["sft_count"],
    )  # fmt: skip
    grads = torch.autograd.grad(out.loss, list(leaves.values()), allow_unused=True)
    grads = torch.stack([torch.zeros(B, dtype=torch.float64) if g is None else g for g in grads])
    return out, grads


def check(out, ref, ref_grads):
    assert_out_close(out.loss.cpu(), ref.loss.detach())
    assert_out_close(out.losses.cpu(), ref.losses.detach())
    assert_out_close(out.rewards.cpu(), torch.stack([ref.chosen_rewards, ref.rejected_rewards]))
    ref_metrics = torch.stack([ref.metrics[k] for k in L.REWARD_METRICS]).detach()
    assert_out_close(out.metrics.cpu(), ref_metrics)
    assert_grad_close(out.grads.cpu(), ref_grads)


def compare(x: dict, *, pair_weights=None, with_sft_sum=True, **options):
    config = L.loss_config(**options, use_weighting=pair_weights is not None)
    out = run_kernel(x, config, pair_weights=pair_weights, with_sft_sum=with_sft_sum)
    ref, ref_grads = run_reference(x, options, pair_weights=pair_weights, with_sft_sum=with_sft_sum)
    check(out, ref, ref_grads)
    return out


@pytest.mark.parametrize("loss_type", L.LOSS_TYPES)
def test_dpo_fwd_loss_type(loss_type):
    compare(make_inputs(37), loss_type=loss_type, label_smoothing=EPS.get(loss_type, 0.0))


# β from small (large 1/(2β) in ipo, sppo_hard) to large (saturating σ); ε at the ends of its range
@pytest.mark.parametrize(
    "loss_type, beta, eps",
    [
        pytest.param("ipo", 0.01, 0.0, id="ipo-beta0.01"),
        pytest.param("sppo_hard", 0.01, 0.0, id="sppo_hard-beta0.01"),
        pytest.param("sigmoid", 2.0, 0.0, id="sigmoid-beta2"),
        pytest.param("exo_pair", 0.5, 1e-3, id="exo_pair-eps1e-3"),
        pytest.param("exo_pair", 0.5, 0.9, id="exo_pair-eps0.9"),
        pytest.param("robust", 0.5, 0.45, id="robust-eps0.45"),
        pytest.param("aot", 0.5, 0.0, id="aot-eps0"),
        pytest.param("aot_unpaired", 0.5, 0.5, id="aot_unpaired-eps0.5"),
        pytest.param("discopop", 0.5, 0.0, id="discopop-beta0.5"),
    ],
)
def test_dpo_fwd_parameters(loss_type, beta, eps):
    compare(make_inputs(37), loss_type=loss_type, beta=beta, label_smoothing=eps)


def test_dpo_fwd_discopop_tau():
    compare(make_inputs(37), loss_type="discopop", discopop_tau=2.0)


@pytest.mark.parametrize(
    "loss_type, loss_weights",
    [
        pytest.param(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], id="mpo"),
        pytest.param(["sigmoid", "sft"], [1.0, 0.5], id="rpo"),
        pytest.param(["sigmoid", "sigmoid"], [0.25, 1.5], id="repeated"),
        pytest.param(["aot", "aot_unpaired", "ipo"], None, id="both-aot"),
        pytest.param(list(L.LOSS_TYPES), [0.1 * (k + 1) for k in range(len(L.LOSS_TYPES))], id="all-types"),
    ],
)
def test_dpo_fwd_mix(loss_type, loss_weights):
    compare(make_inputs(37), loss_type=loss_type, loss_weights=loss_weights, label_smoothing=0.1)


F_DIVERGENCE_CASES = [
    pytest.param("forward_kl", 0.5, id="forward_kl"),
    pytest.param("js_divergence", 0.5, id="js"),
    pytest.param("alpha_divergence", 0.5, id="alpha0.5"),
    pytest.param("alpha_divergence", 1.7, id="alpha1.7"),
    pytest.param("alpha_divergence", 1.0 + 1e-8, id="alpha~1-is-reverse_kl"),
]


@pytest.mark.parametrize("f_divergence_type, coef", F_DIVERGENCE_CASES)
@pytest.mark.parametrize("loss_type", sorted(L.F_DIVERGENCE_LOSSES))
def test_dpo_fwd_f_divergence(loss_type, f_divergence_type, coef):
    # log-ratios of a few nats: forward_kl's exp(−x) and the alpha map stay far from fp32 overflow
    compare(
        make_inputs(29, margin_scale=3.0),
        loss_type=loss_type,
        label_smoothing=EPS.get(loss_type, 0.0),
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=coef,
    )


@pytest.mark.parametrize("coef", [0.5, 3.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "sigmoid_norm"])
def test_dpo_fwd_alpha_divergence_clamp(loss_type, coef):
    # (a − 1)·x beyond the clamp (80) on about half the pairs, where the score is ±e^80/|a − 1| and
    # f' = 0. (ipo squares that score: inf in fp32, for TRL as for us.)
    B = 32
    x = make_inputs(B, margin_scale=0.0)
    beyond = 100.0 / (coef - 1.0) * (1 + torch.rand(B))
    x["pc"] = x["rc"] + torch.where(torch.rand(B) < 0.5, beyond, torch.randn(B))
    x["pr"] = x["rr"] + torch.where(torch.rand(B) < 0.5, beyond.flip(0), torch.randn(B))
    options = {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": coef}
    compare(x, loss_type=loss_type, **options)


@pytest.mark.parametrize(
    "loss_type",
    [
        ["sigmoid"],
        ["hinge"],
        ["ipo"],
        ["sigmoid_norm"],
        ["apo_down"],
        ["sft"],
        ["sigmoid", "bco_pair", "sft"],
    ],
    ids=lambda names: "+".join(names),
)
def test_dpo_fwd_wpo(loss_type):
    x = make_inputs(37)
    compare(x, loss_type=loss_type, pair_weights=torch.rand(37) * 2)


@pytest.mark.parametrize("loss_type", L.LOSS_TYPES)
def test_dpo_fwd_saturated(loss_type):
    # z = β·Δ from −1e3 to 1e3 (β = 1), through TRL's discopop NaN region (z < −88.7): finite, right
    B = 64
    z = torch.cat(
        [
            torch.tensor([-1000.0, -89.0, -88.0, -30.0, 0.0, 30.0, 88.0, 89.0, 1000.0]),
            torch.empty(B - 9),
        ]
    )
    z[9:] = (torch.rand(B - 9) * 2 - 1) * 1000
    x = make_inputs(B, margin_scale=0.0)
    x["pc"] = x["rc"] + z / 2
    x["pr"] = x["rr"] - z / 2
    out = compare(x, loss_type=loss_type, beta=1.0, label_smoothing=EPS.get(loss_type, 0.0))
    for t in (out.loss, out.losses, out.grads, out.metrics):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize(
    "B",
    [
        pytest.param(1, id="B1"),
        pytest.param(7, id="B7-odd"),
        pytest.param(1025, id="B1025-one-past-a-block"),  # two blocks, the second of one pair
        pytest.param(4096, id="B4096"),  # four full blocks
    ],
)
def test_dpo_fwd_batch_size(B):
    # sorting across blocks (aot), batch sums across blocks (sft), one of each kind of loss
    compare(
        make_inputs(B),
        loss_type=["sigmoid", "aot", "sft", "ipo"],
        loss_weights=[1.0, 0.5, 0.25, 0.01],
        label_smoothing=0.1,
    )


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_dpo_fwd_aot_ties(loss_type):
    # many equal differences: the stable sort decides who gets which rank, as in the reference
    x = make_inputs(40)
    x["rc"] = torch.randint(-3, 0, (40,)).float()
    x["rr"] = torch.randint(-3, 0, (40,)).float()
    x["pc"] = x["rc"] + torch.randint(-2, 3, (40,)).float()
    x["pr"] = x["rr"] + torch.randint(-2, 3, (40,)).float()
    compare(x, loss_type=loss_type, label_smoothing=0.1)


def test_dpo_fwd_accuracy_ties():
    # rewards/accuracies is strict: equal rewards count 0
    x = make_inputs(16)
    x["pc"], x["rc"] = x["pr"].clone(), x["rr"].clone()
    out = compare(x, loss_type="sigmoid")
    assert out.metrics[L.REWARD_METRICS.index("rewards/accuracies")].item() == 0.0


@pytest.mark.parametrize("loss_type", [["sft"], ["sigmoid", "sft"]], ids=["sft", "sigmoid+sft"])
def test_dpo_fwd_sft_from_pc(loss_type):
    # without sft_sum the sft term reads pc; its gradient lands in row 0 and row 4 stays 0
    x = make_inputs(21)
    out = compare(x, loss_type=loss_type, with_sft_sum=False)
    assert (out.grads[4] == 0).all()


def test_dpo_fwd_sft_without_tokens():
    # no chosen completion token in the batch: 0, not 0/0
    x = make_inputs(9)
    x["sft_count"] = torch.zeros(9, dtype=torch.int64)
    x["sft_sum"] = torch.zeros(9)
    out = compare(x, loss_type="sft")
    assert (out.losses == 0).all()


def test_dpo_fwd_float_lengths():
    # lengths and counts may come as fp32 (as api.py passes them): same results as int64
    x = make_inputs(23)
    config = L.loss_config(["ipo", "sigmoid_norm", "sft"])
    out_int = run_kernel(x, config)
    x_float = {
        **x,
        **{k: x[k].float() for k in ("chosen_lengths", "rejected_lengths", "sft_count")},
    }
    out_float = run_kernel(x_float, config)
    for a, b in zip(out_int, out_float):
        assert torch.equal(a, b)


@pytest.mark.parametrize("loss_type", L.LOSS_TYPES)
def test_dpo_fwd_nan_in_nan_out(loss_type):
    x = make_inputs(11)
    x["pc"][3] = float("nan")
    config = L.loss_config(loss_type, label_smoothing=EPS.get(loss_type, 0.0))
    out = run_kernel(x, config, with_sft_sum=False)  # sft reads pc
    assert torch.isnan(out.loss).item()


def test_dpo_fwd_errors():
    x = make_inputs(4)
    t = [x[k] for k in ("pc", "pr", "rc", "rr")]
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_fwd(*t, config=L.loss_config("ipo"))
    with pytest.raises(ValueError, match="aot"):
        dpo_fwd(*t, config=L.loss_config("aot"), pair_weights=torch.ones(4))
    with pytest.raises(ValueError, match="sft_count"):
        dpo_fwd(*t, config=L.loss_config("sft"))
    with pytest.raises(ValueError, match=str(MAX_TERMS)):
        dpo_fwd(*t, config=L.loss_config(["sigmoid"] * (MAX_TERMS + 1)))
    with pytest.raises(ValueError, match="B = 0"):
        dpo_fwd(*(v[:0] for v in t), config=L.loss_config("sigmoid"))
