"""What only the native CPU backend has (csrc/ through dpo_kernels.cpu): its build and cache, the reference
fallback when the build fails (or DPO_KERNELS_CPU_BACKEND=reference), thread-count independence, and the operators
themselves (schemas, opcheck, torch.compile).

Its values, stats and gradients are tested in test_logprobs.py, with the same tests as the Triton launchers
(the `cpu` case of the `kernels` fixture).
"""

import platform
import sys
import warnings

import pytest
import torch
from conftest import DTYPES, assert_grad_close, assert_out_close

from dpo_kernels import cpu, dispatch, reference, token_logps

# The tests that exercise the fallback itself and run whether or not the build works.
WITHOUT_BUILD = {
    "test_build_dir",
    "test_build_dir_keyed_on_what_changes_the_build",
    "test_build_announced_once_when_it_runs",
    "test_fallback_when_build_fails",
    "test_fallback_when_compile_fails",
    "test_forced_reference_backend",
}


@pytest.fixture(autouse=True)
def _native(request):
    """Every other test needs the build (made, or loaded from the cache, on the first call): without it they fail."""
    if request.function.__name__ not in WITHOUT_BUILD and not cpu.available():
        pytest.fail(
            "the native CPU backend is not available: the build failed (see the RuntimeWarning) or "
            "DPO_KERNELS_CPU_BACKEND=reference is set"
        )


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


# The build and its cache.


def test_build_dir(monkeypatch, tmp_path):
    """The build folder sits under $TORCH_EXTENSIONS_DIR/dpo_kernels, else $XDG_CACHE_HOME/dpo_kernels, else
    ~/.cache/dpo_kernels, and its name says which torch, Python and machine."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    in_extensions = cpu._build_dir()
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    in_xdg = cpu._build_dir()
    monkeypatch.delenv("XDG_CACHE_HOME")
    in_home = cpu._build_dir()
    assert in_extensions.parent == tmp_path / "ext" / "dpo_kernels"
    assert in_xdg.parent == tmp_path / "xdg" / "dpo_kernels"
    assert in_home.parent == tmp_path / "home" / ".cache" / "dpo_kernels"
    tag = in_home.name
    assert in_extensions.name == in_xdg.name == tag
    assert all(c.isalnum() or c in "._-" for c in tag)
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert torch.__version__.split("+")[0] in tag and python in tag and platform.machine() in tag


def test_build_dir_keyed_on_what_changes_the_build(monkeypatch, tmp_path):
    """Two checkouts sharing the cache never share a folder unless they would build the same library: the folder
    changes with the sources' contents, the flags, the compiler and the torch install, and only with those."""
    sources = tmp_path / "csrc"
    sources.mkdir()
    for name in cpu._SOURCES:
        (sources / name).write_bytes((cpu._source_dir() / name).read_bytes())
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(cpu, "_source_dir", lambda: sources)
    first = cpu._build_dir()
    (sources / "ops.cpp").touch()  # the same contents: the same folder
    assert cpu._build_dir() == first
    with open(sources / cpu._SOURCES[0], "a") as f:
        f.write("\n// another checkout\n")
    edited = cpu._build_dir()
    monkeypatch.setattr(cpu, "_CFLAGS", (*cpu._CFLAGS, "-DDPO_TEST"))
    flags = cpu._build_dir()
    monkeypatch.setenv("CXX", "clang++")
    compiler = cpu._build_dir()
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "other-env" / "torch" / "__init__.py"))
    other_torch = cpu._build_dir()
    assert len({first, edited, flags, compiler, other_torch}) == 5
    assert all(d.parent == tmp_path / "ext" / "dpo_kernels" for d in (first, edited, flags, compiler, other_torch))


def test_build_announced_once_when_it_runs(monkeypatch, tmp_path, capsys):
    """The first build says so on stderr, once per process, naming its folder; loading a cached build says
    nothing. (cpp_extension.load is replaced by a stand-in that "builds" the library file.)"""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpu._announce_build, "done", False, raising=False)
    calls = []

    def fake_load(*, name, build_directory, **kwargs):
        calls.append(build_directory)
        (tmp_path / "dpo_kernels").mkdir(exist_ok=True)
        open(f"{build_directory}/{name}.so", "w").close()

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(cpu, "_register_fakes", lambda: None)  # no operators in the stand-in
    cpu._load()  # builds: announced
    err = capsys.readouterr().err
    assert err.count("dpo_kernels: building the CPU kernels") == 1 and str(cpu._build_dir()) in err
    (cpu._build_dir() / f"{cpu._NAME}.so").unlink()
    cpu._load()  # a second build in the same process: not announced twice
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(cpu._announce_build, "done", False)  # as in a new process
    cpu._load()  # the library is there: cpp_extension only loads it, nothing is printed
    assert capsys.readouterr().err == "" and len(calls) == 3


def test_build_cached_and_loaded_once(monkeypatch):
    """The library sits in its build directory, its operators are registered, and later available() calls answer
    from memory (no second build or load)."""
    assert (cpu._build_dir() / f"{cpu._NAME}.so").is_file()
    assert hasattr(torch.ops.dpo_kernels, "logprobs_fwd") and hasattr(torch.ops.dpo_kernels, "logprobs_bwd_")

    def second_load():
        raise AssertionError("the native backend was built or loaded twice")

    monkeypatch.setattr(cpu, "_load", second_load)
    assert cpu.available() is True


# Threads.


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
    assert not ops.logprobs_partial_fwd.default._schema.is_mutable
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
    # partial mode (dpo_kernels.parallel): the shard [100, 300) of a vocabulary of 500, its gradient
    shard = logits[:, 100:]
    torch.library.opcheck(ops.logprobs_partial_fwd.default, (shard, labels, -100, 0.8, True, 100, 500))
    torch.library.opcheck(ops.logprobs_partial_fwd.default, (shard, labels, -100, 1.0, False, 100, 500))
    torch.library.opcheck(ops.logprobs_bwd.default, (shard, *bwd_args, 100))
    torch.library.opcheck(ops.logprobs_bwd_.default, (shard.clone(), *bwd_args, 100))


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

    monkeypatch.delenv("DPO_KERNELS_CPU_BACKEND", raising=False)
    monkeypatch.setattr(cpu, "_loaded", None)
    monkeypatch.setattr(cpu, "_load", broken_load)


def _check_fallback_matches_reference(monkeypatch):
    """Without the native kernels, CPU calls go to the reference: `dispatch.pick` says so (and refuses an explicit
    backend="cpu"), and the public `token_logps` gives the float64 oracle's values and gradients."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # else CPU tensors run the Triton interpreter
    logits, labels = make_inputs(6, 100, torch.bfloat16)
    assert dispatch.pick(logits) == "reference"
    with pytest.raises(ValueError, match="backend 'cpu' needs CPU tensors and the native extension"):
        dispatch.pick(logits, "cpu")
    grad_logps, grad_entropy = torch.randn(6), torch.randn(6)
    x = logits.clone().requires_grad_(True)
    logps, stats = token_logps(x, labels, return_stats=True, temperature=0.9)
    (grad,) = torch.autograd.grad([logps, stats.entropy], x, [grad_logps, grad_entropy])
    logps_ref, _, stats_ref, grad_ref = oracle(
        logits, labels, grad_logps=grad_logps, grad_entropy=grad_entropy, temperature=0.9
    )
    assert_out_close(logps, logps_ref)
    assert_out_close(torch.stack([s.to(logps.dtype) for s in stats]), stats_ref)
    assert_grad_close(grad, grad_ref)


def test_fallback_when_build_fails(failing_build, monkeypatch):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpu.available() is False
        assert cpu.available() is False
        _check_fallback_matches_reference(monkeypatch)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "simulated" in messages[0] and "falling back" in messages[0]


def test_fallback_when_compile_fails(monkeypatch, tmp_path):
    """A real compile error (a broken source, a scratch build directory) falls back the same way."""
    src = tmp_path / "src"
    src.mkdir()
    for name in cpu._SOURCES:
        (src / name).write_text("this is not C++;\n")
    monkeypatch.delenv("DPO_KERNELS_CPU_BACKEND", raising=False)
    monkeypatch.setattr(cpu, "_loaded", None)
    monkeypatch.setattr(cpu, "_source_dir", lambda: src)
    monkeypatch.setattr(cpu, "_build_dir", lambda: tmp_path / "build")
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert cpu.available() is False


def test_forced_reference_backend(monkeypatch):
    monkeypatch.setenv("DPO_KERNELS_CPU_BACKEND", "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # forcing the fallback is not worth a warning
        assert dispatch.native_available() is False
        _check_fallback_matches_reference(monkeypatch)
