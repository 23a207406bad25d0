"""dpo_kernels.parallel against the single-process functions: logits and output layers sharded over the vocabulary,
over gloo in spawned processes (world sizes 2 and 3; V = 37 divides by neither), on both kernel backends.

Each world runs every scenario once (one spawn per world size, all calls of a scenario before its asserts, so that a
failing rank cannot leave the others waiting in a collective); each test then reads its scenario's outcome. The
oracle is the single-process function on the whole logits / weight, on the same backend: every output, stat and
gradient within the fp32 tolerance of conftest (is_top1 exactly), and the collectives of every call counted
(`torch.distributed` wrapped): two all-reduces forward, none backward from logits, one (grad_hidden) from the hidden
states.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import GRAD_TOL, INTERPRET, OUT_TOL

import dpo_kernels as dk
from dpo_kernels import chunked, cpu, losses
from dpo_kernels import parallel as dkp

IGNORE = -100
V = 37  # not a multiple of 2 or 3: uneven shards
ALL_LOSSES = list(losses.LOSS_TYPES)
BACKENDS = [pytest.param("triton", marks=pytest.mark.triton), "cpu"]
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast")


# ----------------------------------------------------------------------------------------------------------------
# The harness


@contextlib.contextmanager
def counted():
    """Counts the torch.distributed collectives called inside (with the all-reduces' bytes)."""
    calls: list[tuple[str, int]] = []
    saved = {name: getattr(dist, name) for name in COLLECTIVES}

    def wrap(name):
        def call(tensor, *args, **kwargs):
            calls.append((name, tensor.numel() * tensor.element_size()))
            return saved[name](tensor, *args, **kwargs)

        return call

    for name in COLLECTIVES:
        setattr(dist, name, wrap(name))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def even_shard(world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of torch.chunk's split of V over `world` ranks (what a DTensor with Shard(-1) holds)."""
    chunk = -(-V // world)
    return min(rank * chunk, V), min((rank + 1) * chunk, V)


def uneven_shard(world: int, rank: int) -> tuple[int, int]:
    """An uneven split with the ranks in reverse order of their columns (any order must work)."""
    cuts = {2: [0, 10, V], 3: [0, 5, 20, V]}[world]
    k = world - 1 - rank
    return cuts[k], cuts[k + 1]


def _worker(rank: int, world: int, init_file: str, cases: list[tuple[str, str]], queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    outcomes = {}
    for name, backend in cases:
        try:
            SCENARIOS[name](rank, world, backend)
            outcomes[(name, backend)] = None
        except Exception:  # reported by the test of that scenario
            outcomes[(name, backend)] = f"rank {rank}:\n{traceback.format_exc()}"
    queue.put(outcomes)
    dist.destroy_process_group()


_RESULTS: dict[int, dict] = {}


def world_results(world: int) -> dict:
    """Every scenario's outcome in a world of `world` processes (spawned once per world size): None or the failing
    ranks' tracebacks."""
    if world not in _RESULTS:
        backends = (["triton"] if INTERPRET or torch.cuda.is_available() else []) + ["cpu"]
        assert cpu.available(), "the native CPU backend must build"
        cases = [(name, backend) for name in SCENARIOS for backend in backends]
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        with tempfile.TemporaryDirectory() as tmp:
            procs = [
                ctx.Process(target=_worker, args=(r, world, os.path.join(tmp, "store"), cases, queue))
                for r in range(world)
            ]
            for p in procs:
                p.start()
            outcomes = [queue.get(timeout=600) for _ in procs]
            for p in procs:
                p.join(timeout=60)
        merged = {}
        for case in cases:
            failures = [o[case] for o in outcomes if o[case] is not None]
            merged[case] = "\n".join(failures) if failures else None
        _RESULTS[world] = merged
    return _RESULTS[world]


def check(world: int, name: str, backend: str) -> None:
    outcome = world_results(world)[(name, backend)]
    if outcome is not None:
        pytest.fail(outcome, pytrace=False)


def assert_out(a, b, msg=""):
    torch.testing.assert_close(a.double(), b.double(), equal_nan=True, **OUT_TOL, msg=lambda m: f"{msg}: {m}")


# ----------------------------------------------------------------------------------------------------------------
# Scenarios: run in every rank of a world


def _token_inputs(world: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[9, V] logits (the same on every rank) with ties across the first shard boundary b, a NaN row, a row of −inf
    on the first shard, labels at the edges and an ignored row."""
    g = torch.Generator().manual_seed(1234)
    logits = 3 * torch.randn(9, V, generator=g)
    labels = torch.randint(0, V, (9,), generator=g)
    b = even_shard(world, 1)[0]
    logits[0, [b - 1, b]] = 20.0  # a tie across the boundary, the label on the later column: not top-1
    labels[0] = b
    logits[1, [b - 1, b]] = 20.0  # the same tie, the label on the first: top-1
    labels[1] = b - 1
    logits[2, [0, V - 1]] = 20.0  # a tie between the first and the last column
    labels[2] = 0
    labels[3] = V - 1
    logits[4, V - 2] = float("nan")  # NaN in the last shard: the whole row NaN on every rank
    logits[5, :b] = -float("inf")  # a shard of -inf only
    labels[6] = IGNORE
    return logits.to(dtype), labels


def scenario_token_logps(rank: int, world: int, backend: str) -> None:
    for dtype, layout in ((torch.float32, "dtensor"), (torch.bfloat16, "plain")):
        full, labels = _token_inputs(world, dtype)
        g = torch.Generator().manual_seed(7)
        g_lp, g_h = torch.randn(9, generator=g), torch.randn(9, generator=g)
        x = full.clone().requires_grad_(True)
        lp, stats = dk.token_logps(x, labels, temperature=0.7, return_stats=True, backend=backend)
        (grad,) = torch.autograd.grad([lp, stats.entropy], x, [g_lp, g_h])

        if layout == "dtensor":
            from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

            mesh = init_device_mesh("cpu", (world,))
            sharded = distribute_tensor(full, mesh, [Shard(-1)]).requires_grad_(True)
            start, stop = even_shard(world, rank)
            kwargs = {}
        else:
            start, stop = uneven_shard(world, rank)
            sharded = full[:, start:stop].clone().requires_grad_(True)
            kwargs = dict(process_group=dist.group.WORLD, vocab_start=start, vocab_size=V)
        with counted() as fwd:
            plp, pstats = dkp.token_logps(
                sharded, labels, temperature=0.7, return_stats=True, backend=backend, **kwargs
            )
        with counted() as bwd:
            (pgrad,) = torch.autograd.grad([plp, pstats.entropy], sharded, [g_lp, g_h])
        pgrad = pgrad.to_local() if layout == "dtensor" else pgrad

        what = f"{dtype} {layout}"
        assert [c for c, _ in fwd] == ["all_reduce"] * 2, (what, fwd)
        # [m, max before] + the tiling's 2, 6 sums + its column count
        assert [nbytes for _, nbytes in fwd] == [2 * 9 * 4 + 8, 6 * 9 * 4 + 4], (what, fwd)
        assert bwd == [], (what, bwd)
        assert_out(plp, lp, what)
        for name in ("entropy", "mean_logit", "log_sum_sq_probs"):
            assert_out(getattr(pstats, name), getattr(stats, name), f"{what} {name}")
        assert torch.equal(pstats.is_top1, stats.is_top1), (what, pstats.is_top1, stats.is_top1)
        assert stats.is_top1[:3].tolist() == [False, True, True]  # the ties are where they were put
        torch.testing.assert_close(pgrad, grad[:, start:stop], equal_nan=True, **GRAD_TOL[dtype], msg=what)


def scenario_token_logps_only(rank: int, world: int, backend: str) -> None:
    """Without stats: one row to take the max of, two to sum (12 bytes per token); the [R, T, V] view read in place."""
    full, labels = _token_inputs(world, torch.float32)
    full3, labels3 = full[:8].view(2, 4, V), labels[:8].view(2, 4)
    x = full3.clone().requires_grad_(True)
    lp = dk.token_logps(x, labels3, backend=backend)
    (grad,) = torch.autograd.grad(lp, x, torch.ones_like(lp))
    start, stop = even_shard(world, rank)
    sharded = full3[..., start:stop].clone().requires_grad_(True)
    kwargs = dict(process_group=dist.group.WORLD, vocab_start=start, vocab_size=V)
    with counted() as fwd:
        plp = dkp.token_logps(sharded, labels3, backend=backend, **kwargs)
    (pgrad,) = torch.autograd.grad(plp, sharded, torch.ones_like(plp))
    assert [nbytes for _, nbytes in fwd] == [1 * 8 * 4 + 8, 2 * 8 * 4 + 4], fwd
    assert_out(plp, lp)
    torch.testing.assert_close(pgrad, grad[..., start:stop], equal_nan=True, **GRAD_TOL[torch.float32])


def _dpo_batch(B: int = 3, T: int = 6):
    g = torch.Generator().manual_seed(99)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = IGNORE  # the prompt
    labels[1, 4:] = IGNORE  # a shorter completion
    rc, rr = -20 * torch.rand(B, generator=g), -20 * torch.rand(B, generator=g)
    return labels, rc, rr, g


def _assert_dpo(out, ref, what: str) -> None:
    for field in ("loss", "losses", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps"):
        assert_out(getattr(out, field), getattr(ref, field), f"{what} {field}")
    assert out.metrics.keys() == ref.metrics.keys(), (what, out.metrics.keys())
    for key, value in ref.metrics.items():
        assert_out(out.metrics[key], value, f"{what} {key}")


def scenario_dpo_from_logits(rank: int, world: int, backend: str) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    labels, rc, rr, g = _dpo_batch()
    full = 2 * torch.randn(*labels.shape, V, generator=g)
    start, stop = even_shard(world, rank)
    mesh = init_device_mesh("cpu", (world,))
    # all 15 loss types in one mix (their per-pair losses compared one by one)
    options = dict(loss_type=ALL_LOSSES, label_smoothing=0.1, beta=0.2, return_stats=True, backend=backend)
    x = full.clone().requires_grad_(True)
    ref = dk.dpo_loss_from_logits(x, labels, rc, rr, **options)
    (grad,) = torch.autograd.grad(ref.loss, x)
    sharded = distribute_tensor(full, mesh, [Shard(-1)]).requires_grad_(True)
    with counted() as fwd:
        out = dkp.dpo_loss_from_logits(sharded, labels, rc, rr, **options)
    with counted() as bwd:
        (pgrad,) = torch.autograd.grad(out.loss, sharded)
    assert [c for c, _ in fwd] == ["all_reduce"] * 2 and bwd == [], (fwd, bwd)
    _assert_dpo(out, ref, "15 losses")
    torch.testing.assert_close(pgrad.to_local(), grad[..., start:stop], **GRAD_TOL[torch.float32])

    # packed rows, LD-DPO, WPO, the reference's logits sharded alike (in the same two collectives), plain shards
    # split unevenly, a term on chosen_logps
    ref_full = full + 0.5 * torch.randn(full.shape, generator=g)
    lengths = torch.tensor([6, 5, 6, 4, 6, 6])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    mask = torch.arange(6)[None] < lengths[:, None]
    packed, ref_packed, packed_labels = full[mask], ref_full[mask], labels[mask]
    options = dict(cu_seqlens=cu, ld_alpha=0.5, use_weighting=True, loss_type=["sigmoid", "sft"], backend=backend)
    x = packed.clone().requires_grad_(True)
    ref = dk.dpo_loss_from_logits(x, packed_labels, ref_logits=ref_packed, **options)
    (grad,) = torch.autograd.grad(ref.loss + ref.chosen_logps.sum(), x)
    start, stop = uneven_shard(world, rank)
    local = packed[:, start:stop].clone().requires_grad_(True)
    shard = dict(process_group=dist.group.WORLD, vocab_start=start, vocab_size=V)
    with counted() as fwd:
        out = dkp.dpo_loss_from_logits(local, packed_labels, ref_logits=ref_packed[:, start:stop], **shard, **options)
    with counted() as bwd:
        (pgrad,) = torch.autograd.grad(out.loss + out.chosen_logps.sum(), local)
    N = packed.shape[0]
    assert [nbytes for _, nbytes in fwd] == [(2 + 1) * N * 4 + 8, (6 + 2) * N * 4 + 4], fwd  # policy with stats + ref
    assert bwd == [], bwd
    _assert_dpo(out, ref, "packed ld wpo ref_logits")
    torch.testing.assert_close(pgrad, grad[:, start:stop], **GRAD_TOL[torch.float32])


def scenario_dpo_from_hidden(rank: int, world: int, backend: str) -> None:
    # several tiles per shard (chunks of 5 rows, column blocks of 8): their partials are merged
    chunked.VOCAB_SPLIT, chunked.VOCAB_BLOCK, chunked.TILE_BYTES = 8, 8, 5 * 8 * 4
    labels, rc, rr, g = _dpo_batch()
    H = 8
    hidden = torch.randn(*labels.shape, H, generator=g)
    weight, bias = torch.randn(V, H, generator=g) / 2, torch.randn(V, generator=g)
    start, stop = even_shard(world, rank)
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    options = dict(loss_type=ALL_LOSSES, label_smoothing=0.1, return_stats=True, softcap=3.0, backend=backend)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    ref = dk.dpo_loss_from_hidden(leaves[0], leaves[1], labels, rc, rr, bias=leaves[2], **options)
    grads = torch.autograd.grad(ref.loss, leaves)
    h = hidden.clone().requires_grad_(True)
    w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_(True)
    b = distribute_tensor(bias, mesh, [Shard(0)]).requires_grad_(True)
    with counted() as fwd:
        out = dkp.dpo_loss_from_hidden(h, w, labels, rc, rr, bias=b, **options)
    with counted() as bwd:
        dh, dw, db = torch.autograd.grad(out.loss, [h, w, b])
    assert [c for c, _ in fwd] == ["all_reduce"] * 2, fwd
    assert bwd == [("all_reduce", hidden.numel() * 4)], bwd  # grad_hidden, once
    _assert_dpo(out, ref, "15 losses from hidden")
    torch.testing.assert_close(dh, grads[0], **GRAD_TOL[torch.float32])
    torch.testing.assert_close(dw.to_local(), grads[1][start:stop], **GRAD_TOL[torch.float32])
    torch.testing.assert_close(db.to_local(), grads[2][start:stop], **GRAD_TOL[torch.float32])

    # the reference's hidden states through the policy's weight shard, in the same two collectives; plain shards
    ref_hidden = hidden + 0.1 * torch.randn(hidden.shape, generator=g)
    options = dict(loss_type="ipo", use_weighting=True, backend=backend)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    ref = dk.dpo_loss_from_hidden(leaves[0], leaves[1], labels, ref_hidden=ref_hidden, **options)
    grads = torch.autograd.grad(ref.loss, leaves)
    start, stop = uneven_shard(world, rank)
    h, w = hidden.clone().requires_grad_(True), weight[start:stop].clone().requires_grad_(True)
    shard = dict(process_group=dist.group.WORLD, vocab_start=start, vocab_size=V)
    with counted() as fwd:
        out = dkp.dpo_loss_from_hidden(h, w, labels, ref_hidden=ref_hidden, **shard, **options)
    dh, dw = torch.autograd.grad(out.loss, [h, w])
    assert [c for c, _ in fwd] == ["all_reduce"] * 2, fwd
    _assert_dpo(out, ref, "ipo wpo ref_hidden")
    torch.testing.assert_close(dh, grads[0], **GRAD_TOL[torch.float32])
    torch.testing.assert_close(dw, grads[1][start:stop], **GRAD_TOL[torch.float32])

    # linear_token_logps with stats: outputs, is_top1 exactly
    lp, stats = dk.linear_token_logps(hidden, weight, labels, bias=bias, return_stats=True, backend=backend)
    plp, pstats = dkp.linear_token_logps(
        hidden, weight[start:stop], labels, bias=bias[start:stop], return_stats=True, backend=backend, **shard
    )
    assert_out(plp, lp, "linear_token_logps")
    for name in ("entropy", "mean_logit", "log_sum_sq_probs"):
        assert_out(getattr(pstats, name), getattr(stats, name), name)
    assert torch.equal(pstats.is_top1, stats.is_top1)
    # and against float64 logits built here (the one-process head above runs chunked.py's loop too): the log-probs
    # and the gradient of the hidden states through the shard's tiles, its vocab_start and the all-reduce
    scored = labels != IGNORE
    h64 = hidden.double().requires_grad_(True)
    lp64 = torch.log_softmax(h64 @ weight.double().T + bias.double(), -1).gather(-1, labels.clamp(min=0)[..., None])
    lp64 = torch.where(scored, lp64[..., 0], 0.0)
    (dh64,) = torch.autograd.grad(lp64.sum(), h64)
    h = hidden.clone().requires_grad_(True)
    plp = dkp.linear_token_logps(h, weight[start:stop], labels, bias=bias[start:stop], backend=backend, **shard)
    (dh,) = torch.autograd.grad(plp.sum(), h)
    assert_out(plp, lp64, "linear_token_logps vs float64")
    torch.testing.assert_close(dh.double(), dh64, atol=1e-5, rtol=1e-5)


def scenario_bad_inputs(rank: int, world: int, backend: str) -> None:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    logits, labels = _token_inputs(world, torch.float32)
    start, stop = even_shard(world, rank)
    local = logits[:, start:stop]
    group = dist.group.WORLD
    mesh = init_device_mesh("cpu", (world,))
    kw = dict(backend=backend)
    with pytest.raises(ValueError, match="pass process_group, vocab_start"):
        dkp.token_logps(local, labels, **kw)
    wrong = rank * (V // world)  # the even split's start, but torch.chunk's shards are ceil(V / world) wide
    with pytest.raises(ValueError, match=r"shards must tile \[0, 37\) exactly once"):
        dkp.token_logps(local, labels, process_group=group, vocab_start=wrong, vocab_size=V, **kw)
    with pytest.raises(ValueError, match="must lie in the vocabulary"):
        dkp.token_logps(local, labels, process_group=group, vocab_start=V - 1, vocab_size=V, **kw)
    with pytest.raises(ValueError, match="drop process_group"):
        dkp.token_logps(distribute_tensor(logits, mesh, [Shard(-1)]), labels, process_group=group, **kw)
    with pytest.raises(ValueError, match=r"sharded on its vocabulary dimension .*Replicate"):
        dkp.token_logps(distribute_tensor(logits, mesh, [Replicate()]), labels, **kw)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 37\)"):
        bad = labels.clone()
        bad[0] = V
        dkp.token_logps(local, bad, process_group=group, vocab_start=start, vocab_size=V, **kw)
    with pytest.raises(ValueError, match="picks the reference backend"):
        dkp.token_logps(local.double(), labels, process_group=group, vocab_start=start, vocab_size=V)
    dpo_labels, rc, rr, _ = _dpo_batch()
    dpo_logits = torch.randn(*dpo_labels.shape, stop - start)
    shard = dict(process_group=group, vocab_start=start, vocab_size=V)
    with pytest.raises(ValueError, match="exactly one way"):
        dkp.dpo_loss_from_logits(dpo_logits, dpo_labels, rc, rr, reference_free=True, **shard, **kw)
    hidden, weight = torch.randn(*dpo_labels.shape, 4), torch.randn(stop - start, 4)
    with pytest.raises(ValueError, match="bias must be this rank's"):
        dkp.dpo_loss_from_hidden(hidden, weight, dpo_labels, rc, rr, bias=torch.zeros(V), **shard, **kw)
    with pytest.raises(ValueError, match="one H"):
        dkp.linear_token_logps(hidden[..., :3], weight, dpo_labels, **shard, **kw)


def scenario_public_api(rank: int, world: int, backend: str) -> None:
    """The public functions hand sharded inputs to dpo_kernels.parallel: a DTensor sharded on its last dim by itself,
    a plain shard with process_group, an output layer with vocab_parallel=True; the same numbers as calling
    parallel directly; the options the parallel path does not take are refused."""
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    def same(a, b, what):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=what)

    mesh = init_device_mesh("cpu", (world,))
    full, labels = _token_inputs(world, torch.float32)
    start, stop = even_shard(world, rank)
    shard = dict(process_group=dist.group.WORLD, vocab_start=start, vocab_size=V, backend=backend)
    dt = distribute_tensor(full, mesh, [Shard(-1)])
    same(dk.token_logps(dt, labels, backend=backend), dkp.token_logps(dt, labels, backend=backend), "DTensor")
    local = full[:, start:stop]
    same(dk.token_logps(local, labels, **shard), dkp.token_logps(local, labels, **shard), "process_group")
    dpo_labels, rc, rr, g = _dpo_batch()
    logits = distribute_tensor(torch.randn(*dpo_labels.shape, V, generator=g), mesh, [Shard(-1)])
    out = dk.dpo_loss_from_logits(logits, dpo_labels, rc, rr, loss_type="ipo", backend=backend)
    same(out.loss, dkp.dpo_loss_from_logits(logits, dpo_labels, rc, rr, loss_type="ipo", backend=backend).loss, "dpo")
    hidden, weight = torch.randn(*dpo_labels.shape, 4, generator=g), torch.randn(V, 4, generator=g)
    w = distribute_tensor(weight, mesh, [Shard(0)])
    out = dk.dpo_loss_from_hidden(hidden, w, dpo_labels, rc, rr, vocab_parallel=True, backend=backend)
    same(out.loss, dkp.dpo_loss_from_hidden(hidden, w, dpo_labels, rc, rr, backend=backend).loss, "from hidden")
    w_local = weight[start:stop]
    lp = dk.linear_token_logps(hidden, w_local, dpo_labels, **shard)
    same(lp, dkp.linear_token_logps(hidden, w_local, dpo_labels, **shard), "linear_token_logps")
    with pytest.raises(ValueError, match="inplace_grad=True is not supported on logits or a head sharded"):
        dk.token_logps(dt, labels, inplace_grad=True, backend=backend)
    with pytest.raises(ValueError, match="keep_logits=True is not supported on logits or a head sharded"):
        dk.dpo_loss_from_hidden(hidden, w, dpo_labels, rc, rr, vocab_parallel=True, keep_logits=True, backend=backend)


SCENARIOS = {
    "token_logps": scenario_token_logps,
    "token_logps_only": scenario_token_logps_only,
    "dpo_from_logits": scenario_dpo_from_logits,
    "dpo_from_hidden": scenario_dpo_from_hidden,
    "bad_inputs": scenario_bad_inputs,
    "public_api": scenario_public_api,
}


# ----------------------------------------------------------------------------------------------------------------
# The tests: one per scenario, world size and backend


WORLDS = [2, 3]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", WORLDS)
def test_token_logps_and_stats(world, backend):
    """Log-probs, entropy, mean logit, log Σp², is_top1 (ties across a shard boundary) and gradients, DTensor and
    uneven plain shards, fp32 and bf16, NaN and −inf rows; 2 all-reduces of 2 + 6 rows forward, none backward."""
    check(world, "token_logps", backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", WORLDS)
def test_token_logps_without_stats(world, backend):
    check(world, "token_logps_only", backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", WORLDS)
def test_dpo_loss_from_logits(world, backend):
    """All 15 loss types on one batch, metrics, gradients; packed + LD-DPO + WPO + sharded ref_logits."""
    check(world, "dpo_from_logits", backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", WORLDS)
def test_dpo_loss_from_hidden(world, backend):
    """All 15 loss types through a sharded weight and bias (softcap, several tiles per shard); grad_hidden,
    grad_weight, grad_bias; one all-reduce backward; ref_hidden; linear_token_logps' stats."""
    check(world, "dpo_from_hidden", backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", WORLDS)
def test_bad_inputs(world, backend):
    check(world, "bad_inputs", backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", WORLDS)
def test_public_api_forwards_sharded_inputs(world, backend):
    check(world, "public_api", backend)
