"""Every kernel variant the launchers of dpo_kernels/ops can produce, compiled for real GPUs without one.

The rest of the suite runs the kernels through Triton's interpreter, which never compiles them: a kernel that does not
compile for a card, or that spills registers in its main loop, passes every other test. Here the launchers
(`logprobs_fwd`, `segments_bwd`, `dpo_fwd`, `linear_logprobs_bwd`, ...) run on small CPU tensors over a grid of their
options (dtypes, return_stats, in-place backward, every loss type, loss mixes, f-divergences, WPO weights, lengths,
the fused head's tiles) with every kernel replaced by a recorder, so the variants come from the launchers themselves
and follow any change to a kernel's arguments. Each recorded launch is specialised the way Triton's JIT would
specialise it (its own binder where the installed Triton has one) and compiled with `triton.compile` for sm_90 and
sm_80; ptxas ships in the triton wheel, no GPU is involved.

The test fails on a compile error, on a kernel of ops/ that no variant launches, and on a register spill inside a loop
(a local-memory load or store, LDL/STL in the SASS, between a backward branch and its target). Spills outside loops
are reported in the table, not failed.

The compiles run in subprocesses without TRITON_INTERPRET (under the interpreter `@triton.jit` objects cannot be
compiled), two at a time, with a Triton cache that persists between runs under the temporary directory.

    python tests/test_compile.py --table > bench/results/<date>-compile-sm80-sm90.md   # registers, spills, smem
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OPS_MODULES = ("logprobs", "segments", "dpo", "linear_logprobs")
TARGETS = (("cuda", 90, 32), ("cuda", 80, 32))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WORKERS = 2
TIMEOUT_S = 900


# ----------------------------------------------------------------------------------------------------------------
# the launches: every launcher over the grid of its options, with the kernels replaced by recorders


@dataclasses.dataclass
class Launch:
    variant: str
    module: str
    kernel: str
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the call instead of running it."""

    def __init__(self, module: str, name: str, log: list[Launch], variant: list[str]):
        self.module, self.name, self.log, self.variant = module, name, log, variant

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(Launch(self.variant[0], self.module, self.name, args, kwargs))

        return launch


def _ops_module(name: str):
    return importlib.import_module(f"dpo_kernels.ops.{name}")


def ops_kernels() -> dict[tuple[str, str], object]:
    """(module, name) → the @triton.jit kernel, for every `*_kernel` of the ops modules."""
    kernels = {}
    for module in OPS_MODULES:
        for name, obj in vars(_ops_module(module)).items():
            if name.endswith("_kernel") and hasattr(obj, "fn") and hasattr(obj, "__getitem__"):
                kernels[(module, name)] = obj
    return kernels


@contextlib.contextmanager
def _recording(log: list[Launch], variant: list[str]):
    kernels = ops_kernels()
    try:
        for module, name in kernels:
            setattr(_ops_module(module), name, _Recorder(module, name, log, variant))
        yield
    finally:
        for (module, name), kernel in kernels.items():
            setattr(_ops_module(module), name, kernel)


def _logprobs_calls(add):
    from dpo_kernels.ops import logprobs

    N = 4
    # Llama 3 / GPT-2 (a row stride not divisible by 16) / a tiny model's vocabulary (a smaller BLOCK_V)
    for V, dtypes in ((128256, DTYPES), (50257, DTYPES), (1000, ("bf16",))):
        labels = torch.zeros(N, dtype=torch.int64)
        lse, g = torch.zeros(N), torch.zeros(N)
        for dname in dtypes:
            x = torch.zeros(N, V, dtype=DTYPES[dname])
            for stats in (False, True):
                add(f"{dname} V={V}" + " stats" * stats, logprobs.logprobs_fwd, x, labels, return_stats=stats)
            for grad_logps, grad_entropy in ((True, False), (True, True), (False, True)):
                for inplace in (False, True):
                    label = f"{dname} V={V}" + " dlogp" * grad_logps + " dentropy" * grad_entropy
                    add(
                        label + " inplace" * inplace,
                        logprobs.logprobs_bwd,
                        x,
                        labels,
                        lse,
                        g if grad_logps else None,
                        grad_entropy=g if grad_entropy else None,
                        entropy=lse if grad_entropy else None,
                        inplace=inplace,
                    )
    # partial mode (dpo_kernels.parallel): a vocabulary shard's partials and its gradient, Llama 3's V over 2 / 3 ranks
    for V in (64128, 42752):
        labels, lse, g = torch.zeros(N, dtype=torch.int64), torch.zeros(N), torch.zeros(N)
        for dname in DTYPES:
            x = torch.zeros(N, V, dtype=DTYPES[dname])
            for stats in (False, True):
                label = f"{dname} V={V} partial" + " stats" * stats
                kw = dict(vocab_start=V, vocab_size=128256, return_stats=stats)
                add(label, logprobs.logprobs_partial_fwd, x, labels, **kw)
            for grad_entropy in (False, True):
                label = f"{dname} V={V} sharded dlogp" + " dentropy" * grad_entropy
                entropy = dict(grad_entropy=g, entropy=lse) if grad_entropy else {}
                add(label, logprobs.logprobs_bwd, x, labels, lse, g, vocab_start=V, **entropy)
    # shifted logits read in place: [R, T, V] views with a batch and a row stride (the general-T kernels)
    V = 128256
    labels, lse, g = torch.zeros(2 * 3, dtype=torch.int64), torch.zeros(2 * 3), torch.zeros(2 * 3)
    for dname in DTYPES:
        x = torch.zeros(2, 4, V, dtype=DTYPES[dname])[:, :-1]
        for stats in (False, True):
            add(f"{dname} [R, T, V] view" + " stats" * stats, logprobs.logprobs_fwd, x, labels, return_stats=stats)
        for inplace in (False, True):
            label = f"{dname} [R, T, V] view dlogp dentropy" + " inplace" * inplace
            add(label, logprobs.logprobs_bwd, x, labels, lse, g, grad_entropy=g, entropy=lse, inplace=inplace)


def _segments_calls(add):
    from dpo_kernels.ops import segments

    S = 8
    for mean_len in (100, 1000):  # BLOCK_T 128 with 1 warp, 1024 with 4
        N = S * mean_len
        labels = torch.zeros(N, dtype=torch.int64)
        n_tokens = torch.zeros(S, dtype=torch.int64)
        g = torch.zeros(S)
        # padded rows (int64 offsets); cu_seqlens as given (int32)
        for starts_dtype in (torch.int64, torch.int32) if mean_len == 1000 else (torch.int64,):
            starts = (torch.arange(S + 1) * mean_len).to(starts_dtype)
            base = f"T={mean_len} starts={str(starts_dtype)[6:]}"
            for C in (1, 5):  # log-probs only / with the 4 stats
                values = torch.zeros(C, N)
                for ld in (None, 0.5):
                    add(
                        f"{base} C={C}" + " ld" * (ld is not None),
                        segments.segments_fwd,
                        values,
                        labels,
                        starts,
                        ld_alpha=ld,
                    )
            for plain in (False, True):
                for ld in (None, 0.5):
                    label = base + " plain" * plain + " ld" * (ld is not None)
                    add(label, segments.segments_bwd, g, g if plain else None, labels, starts, n_tokens, ld_alpha=ld)


def _dpo_calls(add):
    from dpo_kernels import losses as L
    from dpo_kernels.ops import dpo

    def call(B, names, weights=None, dtype="fp32", lengths="f32", wpo=False, sft_sum=True, f_div="reverse_kl"):
        names = (names,) if isinstance(names, str) else tuple(names)
        smoothing = 0.1 if {"exo_pair", "robust"} & set(names) else 0.0
        cfg = L.loss_config(list(names), weights, label_smoothing=smoothing, f_divergence_type=f_div)
        # log-probs: fp32 (dpo_loss on a user's tensors) or float64 (sequence sums)
        pc = torch.zeros(B, dtype={"fp32": torch.float32, "fp64": torch.float64}[dtype])
        n = {"f32": torch.ones(B), "i64": torch.ones(B, dtype=torch.int64), None: None}[lengths]
        sft = "sft" in names
        label = f"B={B} {dtype} {'+'.join(names)}"
        label += (f" lengths={lengths}" if lengths else " no-lengths") + " wpo" * wpo
        label += (" sft_sum" if sft_sum else " sft_on_pc") * sft + (f" {f_div}" if f_div != "reverse_kl" else "")
        add(
            label,
            dpo.dpo_fwd,
            pc,
            pc,
            pc,
            pc,
            config=cfg,
            chosen_lengths=n,
            rejected_lengths=n,
            pair_weights=torch.ones(B) if wpo else None,
            sft_sum=pc if sft and sft_sum else None,
            sft_count=torch.ones(B, dtype=torch.int64) if sft and n is None else None,
        )

    big = 512  # BLOCK_B 256 with 8 warps, two blocks; 8 pairs: BLOCK_B 16 with 4
    for name in L.LOSS_TYPES:  # every single loss type
        for B, dtype in ((8, "fp32"), (big, "fp32"), (big, "fp64")):
            call(B, name, dtype=dtype)
    for name in ("sigmoid", "aot", "sft", "apo_zero"):  # one per branch of _loss_term
        call(big, name, lengths=None)
    for name in ("sigmoid", "ipo", "nca_pair", "sft"):  # aot* refuse WPO weights
        call(big, name, wpo=True)
    for f_div in L.F_DIVERGENCES[1:]:  # js: every loss type that takes one; the others: one per family
        for name in sorted(L.F_DIVERGENCE_LOSSES) if f_div == "js_divergence" else ("sigmoid", "ipo", "sft"):
            call(big, name, f_div=f_div)
    call(big, "sft", sft_sum=False)
    call(big, "sigmoid", lengths="i64")
    mixes = [
        (("sigmoid", "sft"), None),
        (("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0)),  # MPO
        (("apo_zero", "sft"), None),
        (("aot", "aot_unpaired", "sigmoid"), None),
        (("ipo", "sigmoid_norm", "hinge"), None),
        (L.LOSS_TYPES, None),  # all 15 terms: the most a config holds
    ]
    for names, weights in mixes:
        for dtype in ("fp32", "fp64"):
            call(big, names, weights, dtype=dtype)
    call(big, ("sigmoid", "sft"), dtype="fp64", wpo=True, sft_sum=False)
    call(big, ("sigmoid", "sft"), dtype="fp64", f_div="js_divergence")
    call(big, ("sigmoid", "sft"), lengths=None, wpo=True, f_div="alpha_divergence")


def _linear_calls(add):
    from dpo_kernels.ops import linear_logprobs as lin

    V = 384  # 3 vocabulary tiles of 128: 2 forward splits of 2 tiles, 3 backward chunks (first, middle, last)
    # (tokens, H, dtypes, bias and softcap options): the default 128-token tiles with H a multiple of BLOCK_K and
    # BLOCK_H, crossed with bias and softcap; H = 200 (partial K and H blocks, a row stride not divisible by 16);
    # a small batch's 16-token tiles
    shapes = (
        (128, 256, tuple(DTYPES)),
        (128, 200, ("fp32", "bf16")),
        (16, 256, ("bf16",)),
    )
    for N, H, dtypes in shapes:
        labels = torch.zeros(N, dtype=torch.int64)
        lse, g = torch.zeros(N), torch.zeros(N)
        for dname in dtypes:
            dtype = DTYPES[dname]
            hidden, weight = torch.zeros(N, H, dtype=dtype), torch.zeros(V, H, dtype=dtype)
            cfg = lin.linear_launch_config(N, V, H, dtype, hidden.device)._replace(vocab_splits=2, vocab_chunk=128)
            shape = f"{dname} N={N} H={H}"
            # bias and softcap: both or neither; one at a time in bf16
            toggles = [(False, False)] + [(True, True)] * ((N, H) == (128, 256))
            toggles += [(True, False), (False, True)] * ((N, H, dname) == (128, 256, "bf16"))
            for has_bias, has_softcap in toggles:
                bias = torch.zeros(V, dtype=dtype) if has_bias else None
                softcap = 30.0 if has_softcap else None
                base = shape + " bias" * has_bias + " softcap" * has_softcap
                opts = dict(bias=bias, softcap=softcap, config=cfg)
                for stats in (False, True):
                    add(
                        base + " stats" * stats,
                        lin.linear_logprobs_fwd,
                        hidden,
                        weight,
                        labels,
                        return_stats=stats,
                        **opts,
                    )
                for grad_logps, grad_entropy in ((True, False), (True, True), (False, True)):
                    add(
                        base + " dlogp" * grad_logps + " dentropy" * grad_entropy,
                        lin.linear_logprobs_bwd,
                        hidden,
                        weight,
                        labels,
                        lse,
                        g if grad_logps else None,
                        grad_entropy=g if grad_entropy else None,
                        entropy=lse if grad_entropy else None,
                        **opts,
                    )
            # one vocabulary chunk (the first and the last at once); a frozen output layer (no dW)
            one_chunk = cfg._replace(vocab_chunk=None)
            add(shape + " one-chunk", lin.linear_logprobs_bwd, hidden, weight, labels, lse, g, config=one_chunk)
            add(
                shape + " no-dW", lin.linear_logprobs_bwd, hidden, weight, labels, lse, g, weight_grad=False, config=cfg
            )


def record_launches() -> list[Launch]:
    """Every kernel launch of every launcher call in the grid, in a deterministic order."""
    log: list[Launch] = []
    variant = [""]
    calls = []
    for enumerate_calls in (_logprobs_calls, _segments_calls, _dpo_calls, _linear_calls):
        enumerate_calls(lambda label, fn, *args, **kwargs: calls.append((label, fn, args, kwargs)))
    with _recording(log, variant):
        for label, fn, args, kwargs in calls:
            variant[0] = label
            fn(*args, **kwargs)
    return log


# ----------------------------------------------------------------------------------------------------------------
# specialisation and compilation (in a process without TRITON_INTERPRET)


def _gpu_target(backend: str, arch: int, warp_size: int):
    try:
        from triton.backends.compiler import GPUTarget
    except ImportError:  # older layouts
        from triton.compiler.compiler import GPUTarget
    return GPUTarget(backend, arch, warp_size)


def _split_kwargs(fn, kwargs: dict) -> tuple[dict, dict]:
    """(kernel arguments, launch options such as num_warps) of a launch's keyword arguments."""
    names = set(inspect.signature(fn.fn).parameters)
    return {k: v for k, v in kwargs.items() if k in names}, {k: v for k, v in kwargs.items() if k not in names}


def specialize(fn, target, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) of `fn[grid](*args, **kwargs)` as Triton's JIT would compile it for
    `target`: the JIT's own binder (integer 1 and None become constexprs, 16-byte divisibility of pointers and
    integers becomes an attribute). Handles the layouts of Triton 3.2 (name-keyed constants, AttrsDescriptor) and of
    3.3+ (signature with "constexpr" entries, index-path keyed constexprs and attrs)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    inspect.signature(fn.fn).bind(*args, **_split_kwargs(fn, kwargs)[0])  # a TypeError that names the argument
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound = binder(*args, **kwargs)
    if len(bound) == 5:  # Triton 3.2
        bound_args, sig_and_spec, _, _, _ = bound
        sigkeys = [p.name for p in fn.params if not p.is_constexpr]
        signature = {k: "*i8" if v == "none" else v for k, v in zip(sigkeys, sig_and_spec[: len(sigkeys)])}
        bound_vals = tuple(bound_args.values())
        attrs = backend.get_attrs_descriptor(fn.params, bound_vals)
        constant_params = attrs.get_constants()
        constexprs = {
            p.name: v for v, p in zip(bound_vals, fn.params) if p.is_constexpr or p.num in constant_params or v is None
        }
        options = backend.parse_options(kwargs)
        return signature, constexprs, attrs, options
    bound_args, specialization, options = bound
    if hasattr(fn, "_pack_args"):  # 3.5+
        return fn._pack_args(backend, kwargs, bound_args, specialization, options)
    from triton._utils import find_paths_if, get_iterable_path  # 3.3 / 3.4: the same steps, inline in JIT.run

    sigvals = [x[0] for x in specialization]
    signature = {p.name: v for p, v in zip(fn.params, sigvals)}
    constexprs = find_paths_if(sigvals, lambda _, val: val == "constexpr")
    constexprs = {path: get_iterable_path(list(bound_args.values()), path) for path in constexprs}
    attrvals = [x[1] for x in specialization]
    attrs = find_paths_if(attrvals, lambda _, x: isinstance(x, str))
    attrs = {k: backend.parse_attr(get_iterable_path(attrvals, k)) for k in attrs}
    return backend.parse_options(kwargs), signature, constexprs, attrs


def _specialization_key(name: str, spec) -> str:
    if len(spec) == 4 and isinstance(spec[0], dict):  # 3.2: (signature, constexprs, attrs, options)
        signature, constexprs, attrs, options = spec
        attrs = attrs.hash() if hasattr(attrs, "hash") else attrs
    else:
        options, signature, constexprs, attrs = spec
    opts = {k: v for k, v in vars(options).items() if k in ("num_warps", "num_stages", "num_ctas", "maxnreg")}
    return repr(
        (name, sorted(signature.items()), sorted(map(repr, constexprs.items())), repr(attrs), sorted(opts.items()))
    )


def _nvidia_tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found in the triton wheel ({path}) nor on PATH")
    return found


_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);?\s*$")
_LABEL = re.compile(r"^(\.L_\w+):")
_BRANCH = re.compile(r"\bBRA\b.*?\(?(\.L_\w+)\)?")


def cubin_resources(cubin: bytes, name: str) -> dict:
    """Registers and the stack frame + local memory from `cuobjdump -res-usage` (where ptxas puts spilled registers;
    what Triton's n_spills counts, in bytes), and the SASS's local loads / stores (LDL, STL: spills), those inside a
    loop counted apart. A loop is the code between a label and a later branch back to it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True)
        sass = subprocess.run([_nvidia_tool("nvdisasm"), "-c", str(path)], capture_output=True, text=True)
    match = re.search(
        r"Function " + re.escape(name) + r":\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", usage.stdout
    )
    if not match:
        raise RuntimeError(f"cuobjdump -res-usage gave no resources for {name}:\n{usage.stdout}{usage.stderr}")
    regs, stack, _, local = map(int, match.groups())
    labels, instrs, pending = {}, [], []
    for line in sass.stdout.splitlines():
        if m := _LABEL.match(line):
            pending.append(m.group(1))
        elif m := _INSTR.match(line):
            addr = int(m.group(1), 16)
            for label in pending:
                labels[label] = addr
            pending = []
            instrs.append((addr, m.group(2)))
    loops = []
    for addr, text in instrs:
        if (m := _BRANCH.search(text)) and labels.get(m.group(1), addr + 1) <= addr:
            loops.append((labels[m.group(1)], addr))
    local_ops = [(a, t) for a, t in instrs if re.search(r"\b(LDL|STL)(\.|\s)", t)]
    in_loops = [t for a, t in local_ops if any(lo <= a <= hi for lo, hi in loops)]
    return {
        "regs": regs,
        "spill_bytes": stack + local,  # ptxas puts spills in the stack frame
        "spill_instrs": len(local_ops),
        "loop_spill_instrs": len(in_loops),
        "loop_spill_example": in_loops[:3],
    }


def _jobs() -> list[tuple[Launch, tuple, str, list[str]]]:
    """(launch, target, key, variants) per distinct compile: launches with the same specialisation are one job."""
    kernels = ops_kernels()
    jobs: dict[str, tuple] = {}
    for target in TARGETS:
        gpu = _gpu_target(*target)
        for launch in record_launches():
            fn = kernels[(launch.module, launch.kernel)]
            key = repr(target) + _specialization_key(launch.kernel, specialize(fn, gpu, launch.args, launch.kwargs))
            if key in jobs:
                jobs[key][3].append(launch.variant)
            else:
                jobs[key] = (launch, target, key, [launch.variant])
    return list(jobs.values())


def compile_job(launch: Launch, target: tuple) -> dict:
    import triton
    from triton.compiler import ASTSource

    fn = ops_kernels()[(launch.module, launch.kernel)]
    gpu = _gpu_target(*target)
    result = {"kernel": launch.kernel, "target": f"sm_{target[1]}"}
    start = time.perf_counter()
    try:
        spec = specialize(fn, gpu, launch.args, launch.kwargs)
        if isinstance(spec[0], dict):  # 3.2
            signature, constexprs, attrs, options = spec
        else:
            options, signature, constexprs, attrs = spec
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=gpu, options=vars(options))
        result.update(cubin_resources(compiled.asm["cubin"], compiled.metadata.name))
        result.update(shared=compiled.metadata.shared, num_warps=options.num_warps, num_stages=options.num_stages)
    except Exception as exc:  # noqa: BLE001 - reported per variant, the test fails on it
        result["error"] = f"{type(exc).__name__}: {exc}"[:4000]
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def short_error(error: str) -> str:
    """The first and last lines of a compile error (Triton's CompilationError puts the source in between)."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    return " ... ".join(lines[:1] + lines[-1:] if len(lines) > 1 else lines)[:400]


def _list(rows: list[str], limit: int = 40) -> str:
    return "\n".join(rows[:limit] + ([f"... and {len(rows) - limit} more"] if len(rows) > limit else []))


def _worker(index: int, count: int, out: Path) -> None:
    """Compiles jobs index, index + count, ... (heaviest kernels spread over the workers) into `out` (JSON lines)."""
    import triton

    jobs = _jobs()
    with out.open("w") as f:
        f.write(
            json.dumps(
                {"triton": triton.__version__, "jobs": len(jobs), "kernels": sorted(k for _, k in ops_kernels())}
            )
            + "\n"
        )
        f.flush()
        for i, (launch, target, _, variants) in enumerate(jobs):
            if i % count != index:
                continue
            result = compile_job(launch, target)
            result["index"] = i
            result["variant"] = variants[0]
            result["same_as"] = variants[1:]
            f.write(json.dumps(result) + "\n")
            f.flush()


def run_all(
    python: str = sys.executable, workers: int = WORKERS, timeout: float = TIMEOUT_S
) -> tuple[dict, list[dict]]:
    """Runs the workers (processes without TRITON_INTERPRET) and returns (header, results)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(Path(tempfile.gettempdir()) / "dpo_kernels-compile-cache"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
    env.pop("DPO_KERNELS_POISON", None)  # the launchers only allocate here: no need to fill anything with NaN
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"worker{i}.jsonl" for i in range(workers)]
        procs = [
            subprocess.Popen(
                [python, str(Path(__file__).resolve()), "--worker", str(i), "--workers", str(workers), "--out", str(o)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i, o in enumerate(outs)
        ]
        logs = []
        try:
            for proc in procs:
                logs.append(proc.communicate(timeout=timeout)[0])
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        header, results = None, []
        for proc, out, log in zip(procs, outs, logs):
            lines = out.read_text().splitlines() if out.exists() else []
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"compile worker failed (exit {proc.returncode}):\n{log[-6000:]}")
            header = json.loads(lines[0])
            results += [json.loads(line) for line in lines[1:]]
    return header, sorted(results, key=lambda r: r["index"])


# ----------------------------------------------------------------------------------------------------------------
# the test


@pytest.mark.slow
def test_kernels_compile_for_sm80_sm90():
    pytest.importorskip("triton")
    start = time.perf_counter()
    header, results = run_all()
    assert len(results) == header["jobs"], f"{header['jobs']} compiles expected, {len(results)} reported"
    problems = []
    errors = [r for r in results if "error" in r]
    if errors:
        rows = [f"{r['kernel']} [{r['variant']}] {r['target']}: {short_error(r['error'])}" for r in errors]
        problems.append(f"{len(errors)} compiles failed:\n" + _list(rows))
    compiled = {(r["kernel"], r["target"]) for r in results}
    missing = [(k, f"sm_{t[1]}") for k in header["kernels"] for t in TARGETS if (k, f"sm_{t[1]}") not in compiled]
    if missing:
        problems.append(f"kernels of dpo_kernels/ops that no launcher variant reaches: {missing}")
    spills = [r for r in results if r.get("loop_spill_instrs")]
    if spills:
        rows = [
            f"{r['kernel']} [{r['variant']}] {r['target']}: {r['regs']} registers, {r['spill_bytes']} bytes stack "
            f"frame, {r['loop_spill_instrs']} LDL/STL in loops, e.g. {r['loop_spill_example']}"
            for r in spills
        ]
        problems.append(f"{len(spills)} compiles spill registers inside a loop:\n" + _list(rows))
    assert not problems, f"triton {header['triton']}, {len(results)} compiles:\n" + "\n\n".join(problems)
    print(f"\n{len(results)} compiles (triton {header['triton']}) in {time.perf_counter() - start:.0f} s")


# ----------------------------------------------------------------------------------------------------------------
# the table


def _git_sha() -> str:
    """HEAD of the checkout (with "+dirty" when ops/ has uncommitted changes); GIT_SHA for an exported tree."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "dpo_kernels/ops"], cwd=ROOT, capture_output=True, text=True
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("GIT_SHA", "unknown")


def markdown_table(header: dict, results: list[dict]) -> str:
    rows = {}
    for r in results:
        rows.setdefault((r["kernel"], r["variant"]), {})[r["target"]] = r
    targets = sorted({r["target"] for r in results}, reverse=True)
    counts = {t: sum(1 for r in results if r["target"] == t) for t in targets}
    lines = [
        f"# Compile check: {' and '.join(targets)}, Triton {header['triton']}",
        "",
        f"Kernels of `dpo_kernels/ops` compiled for {' and '.join(targets)} by `python tests/test_compile.py --table`, "
        f"Triton {header['triton']}, torch {torch.__version__}, git {_git_sha()}; no GPU. Distinct compiles: "
        + ", ".join(f"{counts[t]} for {t}" for t in targets)
        + ". Registers per thread and local memory (spills) from `cuobjdump -res-usage`; LDL/STL: local loads and "
        "stores in the SASS (in loops / all); shared memory in bytes (Triton's dynamic allocation). "
        "A variant is the first launcher call that produced the compile; `(+n)`: n more calls compiled the same.",
        "",
        "| kernel | variant | warps | "
        + " | ".join(f"{t} regs | {t} spill B | {t} LDL/STL loop/all | {t} smem B" for t in targets)
        + " |",
        "|---|---|---|" + "---|---|---|---|" * len(targets),
    ]
    for (kernel, variant), by_target in rows.items():
        any_r = next(iter(by_target.values()))
        same = len(any_r["same_as"])
        cells = [f"`{kernel}`", variant + (f" (+{same})" if same else ""), str(any_r.get("num_warps", ""))]
        for t in targets:
            r = by_target.get(t)
            if r is None:
                cells += ["-"] * 4
            elif "error" in r:
                cells += ["**error**: " + short_error(r["error"]).replace("|", "/")] + [""] * 3
            else:
                cells += [
                    str(r["regs"]),
                    str(r["spill_bytes"]),
                    f"{r['loop_spill_instrs']}/{r['spill_instrs']}",
                    str(r["shared"]),
                ]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in results if "error" in r or r["loop_spill_instrs"]]
    failed.sort(key=lambda r: (r["target"] != "sm_90", r["kernel"], r["index"]))
    lines += ["", f"## Failures: {len(failed)} of {len(results)} compiles", ""]
    for r in failed:
        why = (
            f"compile error: {short_error(r['error'])}"
            if "error" in r
            else (
                f"{r['regs']} registers, {r['spill_bytes']} bytes stack frame, {r['loop_spill_instrs']} of "
                f"{r['spill_instrs']} local loads/stores inside a loop"
            )
        )
        lines.append(f"- `{r['kernel']}` [{r['variant']}] {r['target']}: {why}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="compile everything and print the Markdown table")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the compile workers (another Triton)")
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per worker")
    parser.add_argument("--json", type=Path, help="also write the raw results there")
    parser.add_argument("--from-json", type=Path, help="print the table of earlier --json results, compile nothing")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        assert os.environ.get("TRITON_INTERPRET") != "1", "compile workers must run without TRITON_INTERPRET"
        _worker(args.worker, args.workers, args.out)
        return
    start = time.perf_counter()
    if args.from_json:
        header, results = json.loads(args.from_json.read_text())
    else:
        header, results = run_all(args.python, args.workers, args.timeout)
    if args.json:
        args.json.write_text(json.dumps([header, results]))
    if args.table:
        print(markdown_table(header, results))
    failed = [r for r in results if "error" in r or r["loop_spill_instrs"]]
    print(
        f"triton {header['triton']}: {len(results)} compiles, {len(failed)} failed, "
        f"{time.perf_counter() - start:.0f} s",
        file=sys.stderr,
    )
    for r in failed:
        why = short_error(r["error"]) if "error" in r else f"{r['loop_spill_instrs']} LDL/STL in loops"
        print(f"  {r['kernel']} [{r['variant']}] {r['target']}: {why}", file=sys.stderr)


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    main()
