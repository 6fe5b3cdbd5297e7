"""Merge kernels: every backend present vs the torch reference, TIES selection, DARE stream, errors."""
import math

import pytest
import torch

from alignmerge import ops
from alignmerge.ops import reference as ref
from alignmerge.ops._backend import available_backends

BACKENDS = available_backends("cpu")
FAST = [b for b in BACKENDS if b != "torch"]
IN_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [(1,), (7,), (33, 65), (5, 3, 11)]


def _inputs(shape, k, dtype, *, seed=0, noise=0.02):
    g = torch.Generator().manual_seed(seed)
    base = (0.05 * torch.randn(shape, generator=g)).to(dtype)
    xs = [(base.float() + noise * torch.randn(shape, generator=g)).to(dtype) for _ in range(k)]
    return base, xs


WEIGHTS = [0.7, -0.3, 0.45, 1.2]
DENSITIES = [0.5, 0.2, 1.0, 0.05]


def _assert_same(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dtype", IN_DTYPES)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_weighted_sum_and_task_arithmetic_match_reference(backend, in_dtype, out_dtype):
    for k in range(1, 5):
        for shape in SHAPES:
            base, xs = _inputs(shape, k, in_dtype, seed=k)
            w = WEIGHTS[:k]
            for normalize in (False, True):
                _assert_same(ops.weighted_sum(xs, w, normalize=normalize, out_dtype=out_dtype, backend=backend),
                             ref.weighted_sum_reference(xs, w, normalize=normalize, out_dtype=out_dtype))
                _assert_same(ops.task_arithmetic(base, xs, w, lambda_=0.8, normalize=normalize, out_dtype=out_dtype,
                                                 backend=backend),
                             ref.task_arithmetic_reference(base, xs, w, lambda_=0.8, normalize=normalize,
                                                           out_dtype=out_dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dtype", IN_DTYPES)
def test_ties_matches_reference(backend, in_dtype):
    for k in range(1, 5):
        for shape in [SHAPES[k - 1], (129, 31)]:
            base, xs = _inputs(shape, k, in_dtype, seed=10 + k)
            w, dens = WEIGHTS[:k], DENSITIES[:k]
            for normalize, lam, out_dtype in [(True, 1.0, torch.bfloat16), (False, 0.6, torch.float32)]:
                got = ops.ties(base, xs, w, density=dens, lambda_=lam, normalize=normalize, out_dtype=out_dtype,
                               backend=backend)
                want = ref.ties_reference(base, xs, w, density=dens, lambda_=lam, normalize=normalize,
                                          out_dtype=out_dtype)
                _assert_same(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_more_experts_than_the_unrolled_combine_matches_reference(backend, in_dtype):
    """Six experts: the C++ combine step runs its any-count loops (1-4 experts are unrolled)."""
    base, xs = _inputs((37, 29), 6, in_dtype, seed=40)
    w, dens = WEIGHTS + [0.2, -0.9], DENSITIES + [0.7, 0.33]
    _assert_same(ops.task_arithmetic(base, xs, w, lambda_=0.8, normalize=True, backend=backend),
                 ref.task_arithmetic_reference(base, xs, w, lambda_=0.8, normalize=True))
    for normalize, lam in [(True, 1.0), (False, 0.6)]:
        _assert_same(ops.ties(base, xs, w, density=dens, lambda_=lam, normalize=normalize, backend=backend),
                     ref.ties_reference(base, xs, w, density=dens, lambda_=lam, normalize=normalize))
    kw = dict(density=dens, seed=8, tensor_index=1, consensus=True, out_dtype=torch.float32)
    _assert_same(ops.dare(base, xs, w, backend=backend, **kw), ref.dare_reference(base, xs, w, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dtype", IN_DTYPES)
def test_dare_matches_reference(backend, in_dtype):
    for k in range(1, 5):
        for shape in [(7,), (33, 65)]:
            base, xs = _inputs(shape, k, in_dtype, seed=20 + k)
            w, dens = WEIGHTS[:k], [0.3, 0.9, 1.0, 0.0][:k]
            for consensus, rescale in [(False, "inverse_density"), (True, "l1"), (True, None), (False, [2.0] * k)]:
                kw = dict(density=dens, seed=5, tensor_index=3, consensus=consensus, rescale=rescale,
                          out_dtype=torch.float32)
                got = ops.dare(base, xs, w, backend=backend, **kw)
                want = ref.dare_reference(base, xs, w, **kw)
                if rescale == "l1" and backend == "triton":  # fp32 partial L1 sums per program
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
                else:
                    _assert_same(got, want)


@pytest.mark.parametrize("backend", FAST)
def test_large_odd_size_bf16(backend):
    n = 1_000_003
    base, xs = _inputs((n,), 3, torch.bfloat16, seed=3)
    w = WEIGHTS[:3]
    _assert_same(ops.weighted_sum(xs, w, backend=backend), ref.weighted_sum_reference(xs, w))
    _assert_same(ops.ties(base, xs, w, density=[0.3, 0.5, 0.01], backend=backend),
                 ref.ties_reference(base, xs, w, density=[0.3, 0.5, 0.01]))
    _assert_same(ops.dare(base, xs, w, density=0.4, seed=1, tensor_index=9, consensus=True, backend=backend),
                 ref.dare_reference(base, xs, w, density=0.4, seed=1, tensor_index=9, consensus=True))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_outputs_past_the_streaming_size_match_reference():
    """Outputs of 32 MiB and more are written with non-temporal stores (csrc kStreamMinBytes; torch's buffers are
    64-byte aligned): every merge kernel, one-pass TIES included, still gives the reference's bytes."""
    n = (32 << 20) // 4 + 4097  # fp32 output just past the streaming size, odd
    base, xs = _inputs((n,), 3, torch.bfloat16, seed=7)
    w, f32 = WEIGHTS[:3], torch.float32
    out = torch.empty(n, dtype=f32)
    assert out.data_ptr() % 64 == 0
    _assert_same(ops.weighted_sum(xs, w, out=out, backend="cpp"), ref.weighted_sum_reference(xs, w, out_dtype=f32))
    _assert_same(ops.task_arithmetic(base, xs, w, lambda_=0.8, out=out, backend="cpp"),
                 ref.task_arithmetic_reference(base, xs, w, lambda_=0.8, out_dtype=f32))
    dens = [0.3, 0.5, 0.9]
    _assert_same(ops.ties(base, xs, w, density=dens, out=out, backend="cpp"),
                 ref.ties_reference(base, xs, w, density=dens, out_dtype=f32))
    kw = dict(density=0.4, seed=1, tensor_index=9, consensus=True, out_dtype=f32)
    _assert_same(ops.dare(base, xs, w, out=out, backend="cpp", **kw), ref.dare_reference(base, xs, w, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_buffer_is_reused(backend):
    base, xs = _inputs((33, 65), 2, torch.bfloat16)
    out = torch.empty((33, 65), dtype=torch.float32)
    got = ops.ties(base, xs, [1.0, 1.0], density=0.4, out=out, backend=backend)
    assert got.data_ptr() == out.data_ptr()
    _assert_same(out, ref.ties_reference(base, xs, [1.0, 1.0], density=0.4, out_dtype=torch.float32))
    got = ops.weighted_sum(xs, [0.5, 0.5], out=out, backend=backend)
    assert got.data_ptr() == out.data_ptr()


# ---------------------------------------------------------------- TIES magnitude selection
def _check_topk_rule(base, x, density, key, cutoff):
    """(key, cutoff) keeps the top-k of |x - base| bits, ties at the threshold at the lowest indices."""
    keys = ref.magnitude_keys_reference(base, x).view(-1)
    n = keys.numel()
    k = ref.magnitude_keep_count(n, density)
    kept = ref.magnitude_mask_reference(base, x, key, cutoff).view(-1)
    assert int(kept.sum()) == k
    if 0 < k < n:
        top = torch.topk(keys, k).values
        assert key == int(top[-1])
        assert key == int(torch.kthvalue(keys, n - k + 1).values)
        assert int(keys[kept].min()) >= int(keys[~kept].max())
        kept_ties = kept[keys == key]
        assert kept_ties[:int(kept_ties.sum())].all()  # the kept ties come first in index order


@pytest.mark.parametrize("backend", BACKENDS)
def test_thresholds_are_exact_topk(backend):
    # bf16 task vectors: many equal magnitudes, so the tie pass is exercised; (257, 201) is over the C++
    # kernel's threshold for per-thread tables, where runs of one key value are counted in registers
    for seed, shape, density in [(0, (1,), 0.5), (1, (7,), 0.3), (2, (257, 33), 0.37), (3, (1000,), 0.999),
                                 (4, (3001,), 1e-4), (5, (64,), 0.0), (6, (64,), 1.0), (7, (257, 201), 0.37)]:
        base, xs = _inputs(shape, 2, torch.bfloat16, seed=seed, noise=0.002)
        th = ops.magnitude_thresholds(base, xs, density, backend=backend)
        for x, key, cutoff in zip(xs, th.keys, th.cutoffs):
            assert (key, cutoff) == ref.magnitude_threshold_reference(base, x, density)
            _check_topk_rule(base, x, density, key, cutoff)
    # the tie pass really ran: a cutoff inside the tensor
    base, xs = _inputs((257, 33), 1, torch.bfloat16, seed=2, noise=0.002)
    assert ops.magnitude_thresholds(base, xs, 0.37, backend=backend).cutoffs[0] < base.numel()


def test_cpp_level1_histogram_and_window_counts_equal_bincount():
    """The C++ level-1 pass on a bf16 fine-tune-like tensor (most keys of a prefix share one value, counted
    in registers; the rest one by one) and its window counts, against torch.bincount."""
    from alignmerge.ops._backend import cpp_extension, dtype_code

    ext = cpp_extension()
    if ext is None:
        pytest.skip("the C++ extension is not built")
    base, xs = _inputs((389, 263), 2, torch.bfloat16, seed=8, noise=0.002)
    keys = [ref.magnitude_keys_reference(base, x) for x in xs]
    prefixes = [int(torch.mode(k >> 16).values) for k in keys]  # the most crowded prefix of each expert
    hist = torch.zeros((2, 65536), dtype=torch.int64)
    window = torch.zeros((2, 6), dtype=torch.int64)
    ext.magnitude_histogram(base.data_ptr(), [x.data_ptr() for x in xs], dtype_code(base), base.numel(), 1,
                            prefixes, hist.data_ptr(), window.data_ptr())
    for e, (k, p) in enumerate(zip(keys, prefixes)):
        hi = k >> 16
        assert torch.equal(hist[e], torch.bincount(k[hi == p] & 0xFFFF, minlength=65536))
        want = [int((hi > p + 2).sum())] + [int((hi == p + 2 - d).sum()) for d in range(5)]
        assert window[e].tolist() == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_selection_and_ties_compose_over_row_chunks(backend):
    rows, cols = 301, 17
    base, xs = _inputs((rows, cols), 3, torch.bfloat16, seed=7, noise=0.003)
    dens = [0.4, 0.11, 0.75]
    whole = ops.magnitude_thresholds(base, xs, dens, backend=backend)
    bounds = [0, 1, 100, 250, rows]
    sel = ops.MagnitudeSelection(base.numel(), dens)
    passes = 0
    while not sel.done:
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            sel.update(base[lo:hi], [x[lo:hi] for x in xs], element_offset=lo * cols, backend=backend)
        sel.finish_pass()
        passes += 1
    assert passes == 3 and sel.thresholds() == whole
    merged = torch.empty((rows, cols), dtype=torch.bfloat16)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        ops.ties(base[lo:hi], [x[lo:hi] for x in xs], [1.0, 0.5, 0.25], density=dens, thresholds=whole,
                 element_offset=lo * cols, out=merged[lo:hi], backend=backend)
    _assert_same(merged, ref.ties_reference(base, xs, [1.0, 0.5, 0.25], density=dens))


def _select_over_chunks(base, xs, dens, bounds, backend):
    """Run a MagnitudeSelection over row chunks; returns (thresholds, the stage of every pass)."""
    cols = base[0].numel()
    sel = ops.MagnitudeSelection(base.numel(), dens)
    stages = []
    while not sel.done:
        stages.append(sel.stage)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            sel.update(base[lo:hi], [x[lo:hi] for x in xs], element_offset=lo * cols, backend=backend)
        sel.finish_pass()
    return sel.thresholds(), stages


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_selection_is_exact_even_when_the_sample_misleads(backend, monkeypatch):
    """Large tensors guess the level-0 bucket from every 16th element; the level-1 window counts confirm it,
    move to a neighbouring bucket, or fall back to the full level-0 pass. Every route gives the exact top-k."""
    from alignmerge.ops import merge as merge_ops

    monkeypatch.setattr(merge_ops, "SAMPLE_MIN_NUMEL", 1)
    rows, cols = 301, 16  # offsets of odd chunks do not start at multiples of the stride
    bounds = [0, 3, 150, 257, rows]
    for dtype in (torch.bfloat16, torch.float32):
        base, xs = _inputs((rows, cols - 1), 3, dtype, seed=11, noise=0.003)
        dens = [0.4, 0.11, 0.75]
        before = [x.clone() for x in xs]
        got, stages = _select_over_chunks(base, xs, dens, bounds, backend)
        assert all(torch.equal(x, b) for x, b in zip(xs, before))  # inputs are read, never written
        assert got == ops.magnitude_thresholds(base, xs, dens, backend="torch") and stages[0] == -1
        for x, key, cut, d in zip(xs, got.keys, got.cutoffs, dens):
            assert (key, cut) == ref.magnitude_threshold_reference(base, x, d)
    # the sampled blocks (flat index // SAMPLE_BLOCK % SAMPLE_STRIDE == 0) one bucket above the rest: the guess
    # moves down one bucket; far above (x4): it is outside the window and the full level-0 pass runs
    g = torch.Generator().manual_seed(5)
    rest = 1.0 + 0.007 * torch.rand((rows, cols), generator=g)  # top 16 key bits 0x3f80
    index = torch.arange(rows * cols).view(rows, cols)
    sampled = index // merge_ops.SAMPLE_BLOCK % merge_ops.SAMPLE_STRIDE == 0
    for scale, route in [(1.0079, [-1, 1, 1]), (4.0, [-1, 1, 0, 1])]:
        x = torch.where(sampled, rest * scale, rest)
        base = torch.zeros_like(x)
        got, stages = _select_over_chunks(base, [x], [0.5], [0, rows], backend)
        assert (got.keys[0], got.cutoffs[0]) == ref.magnitude_threshold_reference(base, x, 0.5)
        if backend != "triton":  # Triton's first pass is a full level-0 histogram
            assert stages[:len(route)] == route


def test_selection_rejects_missing_or_unordered_chunks():
    base, xs = _inputs((40, 5), 1, torch.bfloat16, noise=0.002)
    sel = ops.MagnitudeSelection(base.numel(), [0.5])
    sel.update(base[:20], [xs[0][:20]])
    with pytest.raises(ValueError, match="saw 100 of 200"):
        sel.finish_pass()
    sel = ops.MagnitudeSelection(base.numel(), [0.37])
    for _ in range(2):
        sel.update(base, xs)
        sel.finish_pass()
    assert sel.stage == 2  # the tie pass needs ascending offsets
    with pytest.raises(ValueError, match="in order"):
        sel.update(base[20:], [xs[0][20:]], element_offset=100)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("numel", [3001, 70_001])
def test_ties_check_finite_names_the_input(backend, numel, monkeypatch):
    """TIES can drop a NaN/Inf from its output (top-k, sign election), so check_finite raises for one in
    the inputs; the C++ pass counts the task vector's as it merges (one-pass or not), an overflowing task
    vector of finite inputs is not an input's fault, and check_finite=False merges whatever comes."""
    from alignmerge.errors import NonFiniteError
    from alignmerge.ops import merge as merge_ops

    monkeypatch.setattr(merge_ops, "ONE_PASS_MIN_NUMEL", 1)
    for where, value in [(1, float("nan")), (0, float("inf")), ("base", -float("inf"))]:
        base, xs = _inputs((numel,), 2, torch.bfloat16, seed=7)
        bad = base if where == "base" else xs[where]
        bad[numel // 2] = value
        name = "base" if where == "base" else f"tensors\\[{where}\\]"
        with pytest.raises(NonFiniteError, match=f"ties: {name} contains 1 NaN/Inf values"):
            ops.ties(base, xs, [1.0, 1.0], density=0.3, backend=backend, check_finite=True)
        ops.ties(base, xs, [1.0, 1.0], density=0.3, backend=backend)
    base, xs = _inputs((numel,), 2, torch.float32, seed=7)
    base[0], xs[0][0] = -3e38, 3e38  # finite inputs, an infinite task-vector element
    got = ops.ties(base, xs, [1.0, 1.0], density=0.3, backend=backend, check_finite=True)
    assert torch.isinf(got[0])


def _one_pass_cpp(base, xs, w, dens, out_dtype):
    """The C++ one-pass TIES called directly: (output, ok, keys, cutoffs, band size, elements merged again)."""
    from alignmerge.ops import merge as merge_ops
    from alignmerge.ops._backend import cpp_extension, dtype_code

    n = base.numel()
    out = torch.empty(base.shape, dtype=out_dtype)
    fixed = merge_ops._fixed_thresholds(n, dens)
    ok, keys, cutoffs, band, remerged, _ = cpp_extension().gta_merge(
        base.data_ptr(), [x.data_ptr() for x in xs], dtype_code(base), out.data_ptr(), dtype_code(out), n, 0, w,
        1, True, True, 1.0, False, 1.0, list(fixed.keys), list(fixed.cutoffs), [], [], [],
        [ref.magnitude_keep_count(n, d) for d in dens])
    return out, ok, keys, cutoffs, band, remerged


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("in_dtype", IN_DTYPES)
def test_one_pass_ties_matches_reference(in_dtype, monkeypatch):
    """Whole-tensor TIES on the C++ backend selects in its merge pass (sampled band, exact k-th inside it,
    wrong guesses merged again): the same tensor as the reference, for odd sizes, experts that keep all or
    nothing, bf16 task vectors of a few ulps (keys crowd on few values) and continuous ones."""
    from alignmerge.ops import merge as merge_ops

    monkeypatch.setattr(merge_ops, "ONE_PASS_MIN_NUMEL", 1)
    cases = [((70_001,), [0.3, 0.5, 0.01], 0.02), ((389, 263), [0.37, 1.0, 0.0], 0.002),
             ((1001, 301), [0.5, 0.2, 0.999], 0.002), ((257, 1031), [1e-4, 0.6], 0.02)]
    for i, (shape, dens, noise) in enumerate(cases):
        base, xs = _inputs(shape, len(dens), in_dtype, seed=60 + i, noise=noise)
        w = WEIGHTS[:len(dens)]
        out, ok, keys, cutoffs, band, remerged = _one_pass_cpp(base, xs, w, dens, torch.bfloat16)
        assert ok and band > 0
        for x, d, key, cutoff in zip(xs, dens, keys, cutoffs):
            _check_topk_rule(base, x, d, key, cutoff)
        want = ref.ties_reference(base, xs, w, density=dens, out_dtype=torch.bfloat16)
        _assert_same(out, want)
        for out_dtype, lam, normalize in [(torch.bfloat16, 1.0, True), (torch.float32, 0.6, False)]:
            _assert_same(ops.ties(base, xs, w, density=dens, lambda_=lam, normalize=normalize, out_dtype=out_dtype,
                                  backend="cpp"),
                         ref.ties_reference(base, xs, w, density=dens, lambda_=lam, normalize=normalize,
                                            out_dtype=out_dtype))
        # without sign election the C++ pass takes its per-expert loops, not the fused block
        _assert_same(ops.ties(base, xs, w, density=dens, consensus=False, backend="cpp"),
                     ref.ties_reference(base, xs, w, density=dens, consensus=False))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_one_pass_ties_falls_back_when_the_sample_misleads(monkeypatch):
    """The sampled blocks (block q·16 + 7q mod 16 of each group of 16, csrc TiesSample) far above the rest:
    the guessed band misses the k-th element, the one-pass call reports failure, and ops.ties selects exactly
    and merges again. Tensors under 16 sampled blocks are not guessed at all."""
    from alignmerge.ops import merge as merge_ops

    monkeypatch.setattr(merge_ops, "ONE_PASS_MIN_NUMEL", 1)
    blocks = 16 * 40
    block = torch.arange(blocks * 256) // 256
    sampled = block % 16 == (block // 16 * 7) % 16
    g = torch.Generator().manual_seed(3)
    x = 1.0 + 0.5 * torch.rand(blocks * 256, generator=g)
    x = torch.where(sampled, 4.0 * x, x).to(torch.bfloat16)
    base = torch.zeros_like(x)
    for dens in ([0.5], [0.03]):
        out, ok, *_ = _one_pass_cpp(base, [x], [1.0], dens, torch.bfloat16)
        assert not ok
        _assert_same(ops.ties(base, [x], [1.0], density=dens, backend="cpp"),
                     ref.ties_reference(base, [x], [1.0], density=dens))
    small, xs = _inputs((15 * 16 * 256,), 2, torch.bfloat16, seed=4, noise=0.002)
    assert not _one_pass_cpp(small, xs, [1.0, 1.0], [0.4, 0.4], torch.bfloat16)[1]
    _assert_same(ops.ties(small, xs, [1.0, 1.0], density=0.4, backend="cpp"),
                 ref.ties_reference(small, xs, [1.0, 1.0], density=0.4))


# ---------------------------------------------------------------- DARE stream
def test_dare_stream_same_on_every_backend_and_matches_python_ints():
    key = ref.dare_stream_key(11, 4, 2)
    start = 2**32 - 150  # the stream crosses from page 0 to page 1 (hi32(i) feeds the page key)
    want = torch.tensor([ref.fmix32((i & ref.MASK32) * ref.DARE_WEYL32 + ref.dare_page_key(key, i >> 32))
                         for i in range(start, start + 300)])
    assert torch.equal(ref.dare_uniform_reference(key, 300, start), want)
    for backend in BACKENDS:
        mask = ops.dare_keep_mask(300, 0.3, seed=11, tensor_index=4, expert_index=2, element_offset=start,
                                  backend=backend)
        assert torch.equal(mask, want < ref.dare_keep_below(0.3))


def test_dare_stream_is_uniform_and_independent_across_experts_and_neighbours():
    n = 1 << 20
    u = [ref.dare_uniform_reference(ref.dare_stream_key(5, 7, e), n, 2**32 - n // 2).double() / 2**32
         for e in range(2)]
    counts = torch.histc(u[0], bins=256, min=0.0, max=1.0)
    chi2 = (((counts - n / 256) ** 2) / (n / 256)).sum().item()
    assert chi2 < 400  # 255 degrees of freedom: mean 255, sd 22.6
    bound = 5 / math.sqrt(n)  # correlations of independent uniforms: sd 1/sqrt(n)
    for a, b in [(u[0], u[1]), (u[0][:-1], u[0][1:]), (u[0][:-256], u[0][256:])]:
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < bound


@pytest.mark.parametrize("backend", BACKENDS)
def test_dare_is_chunking_invariant(backend):
    base, xs = _inputs((97, 13), 2, torch.bfloat16, seed=4)
    kw = dict(density=[0.3, 0.6], seed=17, tensor_index=42, consensus=True, out_dtype=torch.float32)
    whole = ops.dare(base, xs, [1.0, 0.5], backend=backend, **kw)
    chunked = torch.empty_like(whole)
    for lo, hi in [(0, 10), (10, 11), (11, 97)]:
        ops.dare(base[lo:hi], [x[lo:hi] for x in xs], [1.0, 0.5], element_offset=lo * 13, out=chunked[lo:hi],
                 backend=backend, **kw)
    _assert_same(chunked, whole)
    # chunks far into a huge tensor (global indices past 2^32)
    far = 2**33 + 5
    _assert_same(ops.dare(base, xs, [1.0, 0.5], element_offset=far, backend=backend, **kw),
                 ref.dare_reference(base, xs, [1.0, 0.5], element_offset=far, **kw))
    # L1 rescale factors accumulated over chunks equal the whole-tensor ones
    l1 = ops.DareL1Rescale([0.3, 0.6], seed=17, tensor_index=42)
    for lo, hi in [(50, 97), (0, 50)]:
        l1.update(base[lo:hi], [x[lo:hi] for x in xs], element_offset=lo * 13, backend=backend)
    whole_l1 = ops.DareL1Rescale([0.3, 0.6], seed=17, tensor_index=42)
    whole_l1.update(base, xs, backend=backend)
    assert l1.factors() == pytest.approx(whole_l1.factors(), rel=1e-6)


def test_dare_keep_rate_and_rescale_are_exact():
    n, density = 400_000, 0.3
    base = torch.zeros(n)
    x = torch.full((n,), 0.5)
    for backend in BACKENDS:
        out = ops.dare(base, [x], [1.0], density=density, seed=3, tensor_index=0, backend=backend)
        kept = out != 0
        rate = kept.double().mean().item()
        assert abs(rate - density) < 5 * math.sqrt(density * (1 - density) / n)
        assert torch.equal(out[kept], torch.full_like(out[kept], 0.5 * float(torch.tensor(1 / density))))
    # keep probability is density to 2^-33
    assert abs(ref.dare_keep_below(density) / 2**32 - density) <= 2**-33
    # different seeds, tensors and experts give different streams
    masks = [ops.dare_keep_mask(1000, 0.5, seed=s, tensor_index=t, expert_index=e)
             for s, t, e in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert not torch.equal(masks[i], masks[j])


# ---------------------------------------------------------------- no NaN, errors
@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_inputs_never_give_nan(backend):
    base, xs = _inputs((3, 7), 2, torch.bfloat16)
    same = [base.clone(), base.clone()]  # tau = 0: sign election keeps nothing, divisor 0 -> 1
    for out in [ops.ties(base, same, [1.0, 1.0], density=0.5, backend=backend),
                ops.dare(base, same, [1.0, 1.0], density=0.5, seed=0, tensor_index=0, consensus=True,
                         rescale="l1", backend=backend),
                ops.task_arithmetic(base, xs, [1.0, -1.0], normalize=True, backend=backend),  # sum w = 0 -> 1
                ops.ties(base, xs, [0.0, 0.0], density=0.5, backend=backend),
                ops.dare(base, xs, [1.0, 1.0], density=0.0, seed=0, tensor_index=0, backend=backend)]:
        assert not torch.isnan(out).any()
    assert torch.equal(ops.ties(base, same, [1.0, 1.0], density=0.5, backend=backend), base)
    assert torch.equal(ops.dare(base, xs, [1.0, 1.0], density=0.0, seed=0, tensor_index=0, backend=backend), base)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dtype", IN_DTYPES)
def test_nonfinite_inputs_always_reach_the_output(backend, in_dtype):
    """The contract behind ``output_reveals_nonfinite_inputs`` (linear, task_arithmetic): a NaN/±Inf in any
    input element makes that output element non-finite on every backend, even at weight 0 or lambda 0."""
    g = torch.Generator().manual_seed(7)
    n = 1031
    base, xs = _inputs((n,), 3, in_dtype, seed=3)
    bad = torch.zeros(n, dtype=torch.bool)
    for t in [base, *xs]:
        idx = torch.randperm(n, generator=g)[:12]
        t[idx[:4]] = float("nan")
        t[idx[4:8]] = float("inf")
        t[idx[8:]] = -float("inf")
        bad[idx] = True
    bad_models = torch.zeros(n, dtype=torch.bool)
    for t in xs:
        bad_models |= ~torch.isfinite(t)
    for w in ([0.0, 1.0, -0.5], [0.0, 0.0, 0.0], [0.3, 0.3, 0.4]):
        for normalize in (False, True):
            if normalize and sum(w) == 0:
                continue
            out = ops.weighted_sum(xs, w, normalize=normalize, out_dtype=torch.float32, backend=backend)
            assert not torch.isfinite(out[bad_models]).any()
            for lam in (1.0, 0.0, -2.0):
                out = ops.task_arithmetic(base, xs, w, lambda_=lam, normalize=normalize, out_dtype=in_dtype,
                                          backend=backend)
                assert not torch.isfinite(out[bad]).any()


def test_errors_name_the_argument():
    base, xs = _inputs((4, 5), 2, torch.bfloat16)
    with pytest.raises(ValueError, match=r"tensors\[1\] has shape"):
        ops.ties(base, [xs[0], xs[1][:3]], [1.0, 1.0], density=0.5)
    with pytest.raises(TypeError, match=r"tensors\[0\] has dtype"):
        ops.task_arithmetic(base, [xs[0].float(), xs[1]], [1.0, 1.0])
    with pytest.raises(TypeError, match=r"tensors\[1\] has dtype"):
        ops.weighted_sum([xs[0], xs[1].half()], [1.0, 1.0])
    with pytest.raises(ValueError, match="weights has 1 entries for 2 tensors"):
        ops.weighted_sum(xs, [1.0])
    with pytest.raises(ValueError, match="density has 3 entries"):
        ops.ties(base, xs, [1.0, 1.0], density=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="out has shape"):
        ops.weighted_sum(xs, [1.0, 1.0], out=torch.empty(3))
    with pytest.raises(ValueError, match="out has dtype"):
        ops.weighted_sum(xs, [1.0, 1.0], out=torch.empty((4, 5)), out_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="unsupported dtype"):
        ops.weighted_sum([xs[0].double()], [1.0])
    with pytest.raises(ValueError, match="non-empty list"):
        ops.weighted_sum([], [])
    with pytest.raises(ValueError, match="needs whole-tensor thresholds"):
        ops.ties(base, xs, [1.0, 1.0], density=0.5, element_offset=10)
    with pytest.raises(ValueError, match="sum to 0"):
        ops.weighted_sum(xs, [1.0, -1.0], normalize=True)
    with pytest.raises(ValueError, match="rescale must be"):
        ops.dare(base, xs, [1.0, 1.0], density=0.5, seed=0, tensor_index=0, rescale="l2")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.weighted_sum(xs, [1.0, 1.0], backend="cuda")
