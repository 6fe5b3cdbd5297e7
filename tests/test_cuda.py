"""The Triton kernels compiled for a real GPU, not interpreted: every kernel family on CUDA tensors against the
torch reference on CPU (fresh random, odd-sized bf16 and fp32 inputs), and whole merges with device="cuda"
against the CPU merge. Skipped without CUDA; on a GPU machine run with TRITON_INTERPRET=0."""
import os

import pytest
import torch

from alignmerge import ops
from alignmerge.ops import reference as ref
from conftest import make_tiny_llama

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs CUDA and compiled (not interpreted) Triton")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
SHAPES = [(1,), (1023,), (129, 31), (513, 2049)]  # single element, partial block, odd 2-D, many programs


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def assert_close(got, want, dtype):
    assert got.device.type == "cuda" and got.dtype == want.dtype and got.shape == want.shape
    assert not torch.isnan(got).any()
    assert rel_err(got, want) <= TOL[dtype]


def family(shape, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    base = (0.05 * torch.randn(shape, generator=g)).to(dtype)
    return base, [(base.float() + 0.02 * torch.randn(shape, generator=g)).to(dtype) for _ in range(k)]


def cuda(*tensors):
    return [t.cuda() for t in tensors]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_merge_kernels_on_cuda_match_reference(shape, dtype):
    base, xs = family(shape, 3, dtype, seed=len(shape) * 7 + shape[0])
    w, dens = [0.7, -0.3, 1.2], [0.5, 0.2, 0.9]
    bc, xc = base.cuda(), cuda(*xs)
    for normalize in (False, True):
        assert_close(ops.weighted_sum(xc, w, normalize=normalize), ref.weighted_sum_reference(xs, w, normalize=normalize),
                     dtype)
        assert_close(ops.task_arithmetic(bc, xc, w, lambda_=0.8, normalize=normalize),
                     ref.task_arithmetic_reference(base, xs, w, lambda_=0.8, normalize=normalize), dtype)
    # the radix select picks exactly the reference's top-k (integer keys and tie cutoffs)
    assert ops.magnitude_thresholds(bc, xc, dens) == ops.magnitude_thresholds(base, xs, dens, backend="torch")
    for normalize, lam in [(True, 1.0), (False, 0.6)]:
        assert_close(ops.ties(bc, xc, w, density=dens, lambda_=lam, normalize=normalize),
                     ref.ties_reference(base, xs, w, density=dens, lambda_=lam, normalize=normalize), dtype)
    for consensus in (False, True):
        kw = dict(density=dens, seed=8, tensor_index=3, consensus=consensus)
        assert_close(ops.dare(bc, xc, w, **kw), ref.dare_reference(base, xs, w, **kw), dtype)


def test_count_nonfinite_on_cuda():
    x = torch.randn(7, 1031)
    x[0, 3], x[5, 1000], x[6, 1030] = float("nan"), float("inf"), -float("inf")
    for dtype in (torch.bfloat16, torch.float32):
        assert ops.count_nonfinite(x.to(dtype).cuda()) == ref.count_nonfinite_reference(x) == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fisher_accumulate_on_cuda(dtype):
    g = torch.Generator().manual_seed(3)
    grads, acts = torch.randn(5, 33, 17, generator=g).to(dtype), torch.randn(5, 33, 40, generator=g).to(dtype)
    start = torch.rand(17, 40, generator=g)
    want = ref.fisher_accumulate_reference(start.clone(), grads, acts)
    got = ops.fisher_accumulate(start.cuda(), grads.cuda(), acts.cuda())
    assert torch.isfinite(got).all() and rel_err(got, want) <= TOL[dtype]


def orthonormal(rows, r, g):
    return torch.linalg.qr(torch.randn(rows, r, generator=g, dtype=torch.float64))[0].float().contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sides", ["both", "u", "v"])
def test_projector_kernels_on_cuda(dtype, sides):
    m, n, r = 301, 173, 7
    g = torch.Generator().manual_seed(11)
    u = orthonormal(m, r, g) if sides != "v" else None
    v = orthonormal(n, r, g) if sides != "u" else None
    uc, vc = (t.cuda() if t is not None else None for t in (u, v))
    x = (3.0 * torch.randn(m, n, generator=g)).to(dtype)
    d = (torch.rand(m, n, generator=g) + 0.1).to(dtype)
    assert_close(ops.project(x.cuda(), uc, vc), ref.project_reference(x, u, v), dtype)
    got = ops.apply_operator(x.cuda(), d.cuda(), uc, vc, 2.75)
    assert got.dtype == torch.float32 and rel_err(got, ref.apply_operator_reference(x, d, u, v, 2.75)) <= 1e-5
    # one fused CG iteration, in place on (x, r, p), against the torch path on the same GPU
    x0, r0, p0 = (torch.randn(m, n, generator=g) for _ in range(3))
    dd = torch.rand(m, n, generator=g) + 0.2
    # (a, g): the low-rank terms of the new direction p = r/M + βp, as the solver passes them
    precond = dd.double() + 1.3 * ref.projector_diagonal_reference(m, n, u, v, torch.float64)
    a, gg = ops.projector.lowrank_terms(*ref.project_factors_reference((r0 / precond + 0.61 * p0).float(), u, v), u)
    results = {}
    for backend in ("torch", "triton"):
        state = cuda(x0, r0, p0)
        args = (*state, dd.cuda(), uc, vc, a.cuda() if a is not None else None, gg.cuda() if gg is not None else None)
        sums, uz, zv = ops.cg_step(*args, alpha=0.37, beta=0.61, mu=2.2, precond_mu=1.3, backend=backend)
        results[backend] = (*state, uz, zv, sums)
    for got, want in zip(results["triton"], results["torch"]):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.isfinite(got).all() and rel_err(got, want) <= 1e-5


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("cuda_llamas")
    base = make_tiny_llama(root / "base", seed=0, hidden=48, vocab=131)
    state = load_file(str(base / "model.safetensors"))
    return base, [make_tiny_llama(root / f"e{i}", seed=i + 1, base_state=state, hidden=48, vocab=131) for i in range(2)]


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_merge_on_cuda_equals_the_cpu_merge(llamas, tmp_path, method):
    """Prefetch through pinned buffers and the copy stream, row chunks under a small budget: within one bf16 ulp
    of the CPU merge; the result reports the device's peak allocation."""
    from safetensors.torch import load_file

    from alignmerge import merge

    base, experts = llamas
    config = {"merge_method": method, "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(e), "parameters": {"weight": w, **({} if method == "linear" else {"density": 0.6})}}
                         for e, w in zip(experts, (1.0, 0.5))]}
    cpu = merge(config, tmp_path / "cpu", progress=False, seed=3)
    gpu = merge(config, tmp_path / "gpu", progress=False, seed=3, device="cuda", max_memory=40_000)
    assert cpu.peak_device_bytes is None and 0 < gpu.peak_device_bytes
    a, b = load_file(str(cpu.out_dir / "model.safetensors")), load_file(str(gpu.out_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        ulp = torch.finfo(torch.bfloat16).eps * a[name].float().abs().clamp_min(1e-30)
        assert ((a[name].float() - b[name].float()).abs() <= ulp).all(), name


@pytest.mark.parametrize("terms", ["default", "projector_only"])
def test_alignmerge_on_cuda_matches_cpu(tmp_path, terms):
    """merge_method alignmerge (Fisher files, subspace, CG solves) on the GPU within 1e-4 of the CPU solve: with
    the default terms (P in L_align, the anchor in L_geo with F_align as its Fisher) and with P alone."""
    from safetensors.torch import load_file, save_file

    from alignmerge import merge

    anchor = make_tiny_llama(tmp_path / "anchor", seed=5, dtype=torch.float32, hidden=40, vocab=67)
    state = load_file(str(anchor / "model.safetensors"))
    experts = [make_tiny_llama(tmp_path / f"e{i}", seed=6 + i, dtype=torch.float32, hidden=40, vocab=67,
                               base_state=state, noise=0.05) for i in range(2)]
    g = torch.Generator().manual_seed(0)
    fishers = []
    for i in range(3):
        fishers.append(tmp_path / f"f{i}.safetensors")
        save_file({n: torch.rand(t.shape, generator=g) + 0.05 for n, t in state.items()}, str(fishers[-1]))
    sub = {}
    for n, t in state.items():
        if t.dim() == 2 and ".layers." in n:
            sub[f"{n}.U"], sub[f"{n}.V"] = orthonormal(t.shape[0], 3, g), orthonormal(t.shape[1], 3, g)
    save_file(sub, str(tmp_path / "sub.safetensors"))
    config = {"merge_method": "alignmerge", "anchor": str(anchor), "dtype": "float32",
              "models": [{"model": str(e), "parameters": {"weight": 1.0, "fisher": str(f)}}
                         for e, f in zip(experts, fishers)],
              "parameters": {"subspace": str(tmp_path / "sub.safetensors"), "use_aqi_loop": False,
                             **({"align_fisher": str(fishers[2])} if terms == "default" else
                                {"lambda_align": 2.0, "use_align_fisher": False, "anchor_weight": 0.0})}}
    cpu = load_file(str(merge(config, tmp_path / "cpu", progress=False).out_dir / "model.safetensors"))
    result = merge(config, tmp_path / "gpu", progress=False, device="cuda")
    gpu = load_file(str(result.out_dir / "model.safetensors"))
    for name in cpu:
        assert rel_err(gpu[name] - state[name], cpu[name] - state[name]) <= 1e-4, name


@pytest.mark.parametrize("method", ["ties", "linear"])
def test_nonfinite_input_on_cuda_names_file_and_tensor(llamas, tmp_path, method):
    """ties: inputs are counted on the GPU after their copies; linear: the merged output is counted on the GPU and
    the inputs are re-read to find the culprit. Either way the NaN names its file and tensor, and no output
    directory appears."""
    import shutil

    from safetensors.torch import load_file, save_file

    from alignmerge import merge
    from alignmerge.errors import NonFiniteError

    base, experts = llamas
    bad = tmp_path / "bad"
    shutil.copytree(experts[1], bad)
    state = load_file(str(bad / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    params = {"weight": 1.0, **({"density": 0.5} if method == "ties" else {})}
    config = {"merge_method": method, "base_model": str(base),
              "models": [{"model": str(m), "parameters": params} for m in (experts[0], bad)]}
    with pytest.raises(NonFiniteError, match=r"bad/model\.safetensors: tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        merge(config, tmp_path / "out", progress=False, device="cuda")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stream", [False, True])
def test_fisher_on_cuda_matches_cpu(tmp_path, stream):
    """compute_fisher with device="cuda" (per-sample gradients on the GPU, in memory and streamed layer by layer)
    equals the CPU pass: fp32, relative error ≤ 1e-5 per tensor, no NaN."""
    from alignmerge import compute_fisher
    from test_fisher import RECORDS, add_char_tokenizer

    model = add_char_tokenizer(make_tiny_llama(tmp_path / "m", seed=3, dtype=torch.float32, hidden=40,
                                               intermediate=72, layers=3))
    cpu = compute_fisher(model, RECORDS, batch_size=2, stream=stream)
    gpu = compute_fisher(model, RECORDS, batch_size=2, stream=stream, device="cuda")
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        assert not torch.isnan(gpu[name]).any(), name
        assert rel_err(gpu[name], cpu[name]) <= 1e-5, name
