"""Projector kernels and the per-weight AlignMerge solve against plain torch, with a bandwidth floor.

In one run, per shape (out×in, rank r):
  copy        a reused-buffer fp32 copy of one matrix (read + write): the machine's copy rate, which
              sets the floor = bytes each op must move / copy rate.
  project     P(X) = UUᵀX + XVVᵀ − UUᵀXVVᵀ on bf16 X: fast path (factors pass + apply pass: read X,
              write Y) vs the torch reference (plain torch matmuls on the whole matrix).
  operator    Y = D⊙X + μP(X) in fp32: fast (read X twice, D once, write Y) vs reference.
  cg_step     one fused PCG iteration (read x, r, p, D; write x, r, p) vs the same step in plain torch.
  solve       solve_weight (two experts, random Fishers, λ_align, fp32) on the fast path vs a textbook
              Jacobi-PCG written with plain torch ops around the same problem (same tolerance).
Each line prints the median time, the bytes the fused op must move, and time / floor (1.0 = at the
copy rate). "fast" is the backend chosen for the tensors' device (CPU: the C++ kernels, plus a
"blocked" line for the blocked-torch stand-in; CUDA: Triton), or --backend.

  python benchmarks/projector_solve.py                      # quick: 1024x1536, r=16
  python benchmarks/projector_solve.py --shapes 4096x4096,4096x14336 --reps 3
On a machine shared with other jobs, prefer --threads 1: a multi-threaded parallel region waits for
its slowest (descheduled) thread, which makes 2-thread timings there meaningless.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from alignmerge.ops import projector as ops
from alignmerge.ops import reference
from alignmerge.solver import solve_weight
from alignmerge.solver.objective import fisher_merge_problem


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps):
    fn()  # warm-up (first touch, compilation)
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_rate(numel, device, reps):
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, reps)
    return 2 * numel * 4 / t  # bytes read + written per second


def textbook_pcg(b, d, u, v, mu, tol, max_iter):
    """Jacobi-PCG in plain torch: q = D⊙p + μP(p) with whole-matrix matmuls, M = D + μ·diag(P)."""
    m, n = b.shape
    precond = d + mu * reference.projector_diagonal_reference(m, n, u, v, b.dtype).to(b.device)
    uf, vf = u.to(b.dtype), v.to(b.dtype)

    def op(x):
        ux = uf.T @ x
        xv = x @ vf
        return d * x + mu * (uf @ ux + (xv - uf @ (uf.T @ xv)) @ vf.T)

    x = b / precond
    r = b - op(x)
    z = r / precond
    p = z.clone()
    rz = torch.dot(r.view(-1), z.view(-1))
    bnorm = b.norm()
    it = 0
    while it < max_iter:
        q = op(p)
        alpha = rz / torch.dot(p.view(-1), q.view(-1))
        x += alpha * p
        r -= alpha * q
        it += 1
        if r.norm() <= tol * bnorm:
            break
        z = r / precond
        rz_new = torch.dot(r.view(-1), z.view(-1))
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x, it


def blocked(fn):
    """fn run on the blocked-torch CPU stand-in (what "cpp" uses when alignmerge._C is not built)."""
    def run():
        saved = ops.cpp_extension
        ops.cpp_extension = lambda: None
        try:
            return fn()
        finally:
            ops.cpp_extension = saved
    return run


def row(name, t_fast, t_plain, nbytes, rate, extra=""):
    floor = nbytes / rate
    plain = f"plain {t_plain * 1e3:9.2f} ms  speed-up {t_plain / t_fast:5.2f}x" if t_plain else ""
    print(f"  {name:9s} fast {t_fast * 1e3:9.2f} ms  {nbytes / 1e6:9.1f} MB  floor {floor * 1e3:8.2f} ms  "
          f"time/floor {t_fast / floor:6.2f}  {plain} {extra}", flush=True)


def bench_shape(m, n, r, args, device):
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(m, r, generator=gen))[0].to(device)
    v = torch.linalg.qr(torch.randn(n, r, generator=gen))[0].to(device)
    numel = m * n
    rate = copy_rate(numel, device, args.reps)
    print(f"{m}x{n} r={r} on {device} ({torch.get_num_threads()} threads): copy rate {rate / 1e9:.1f} GB/s "
          f"(read+write, reused buffers)", flush=True)
    be = args.backend

    x16 = torch.randn(m, n, generator=gen).bfloat16().to(device)
    cpu_cpp = device.type == "cpu" and be in (None, "cpp") and ops.cpp_extension() is not None
    t_fast = timed(lambda: ops.project(x16, u, v, backend=be), device, args.reps)
    t_plain = timed(lambda: reference.project_reference(x16, u, v), device, args.reps)
    row("project", t_fast, t_plain, 2 * numel * 2, rate, "(bf16 X and Y)")
    if cpu_cpp:
        row(" blocked", timed(blocked(lambda: ops.project(x16, u, v, backend="cpp")), device, args.reps),
            t_plain, 2 * numel * 2, rate, "(blocked-torch CPU stand-in)")

    x = torch.randn(m, n, generator=gen).to(device)
    d = (torch.rand(m, n, generator=gen) + 0.1).to(device)
    t_fast = timed(lambda: ops.apply_operator(x, d, u, v, 3.0, backend=be), device, args.reps)
    t_plain = timed(lambda: reference.apply_operator_reference(x, d, u, v, 3.0), device, args.reps)
    row("operator", t_fast, t_plain, 4 * numel * 4, rate, "(fp32)")
    if cpu_cpp:
        row(" blocked", timed(blocked(lambda: ops.apply_operator(x, d, u, v, 3.0, backend="cpp")), device,
                              args.reps), t_plain, 4 * numel * 4, rate, "(blocked-torch CPU stand-in)")

    state = [torch.randn(m, n, generator=gen).to(device) * 1e-3 for _ in range(3)]
    a, g = ops.lowrank_terms(*ops.project_factors(state[2], u, v, backend=be), u)

    def fused_step():
        ops.cg_step(*state, d, u, v, a, g, alpha=1e-3, beta=0.5, mu=3.0, precond_mu=3.0, backend=be)

    def plain_step():
        ops.cg_step(*state, d, u, v, a, g, alpha=1e-3, beta=0.5, mu=3.0, precond_mu=3.0, backend="torch")

    t_fast = timed(fused_step, device, args.reps)
    t_plain = timed(plain_step, device, args.reps)
    row("cg_step", t_fast, t_plain, 7 * numel * 4, rate, "(fp32 state)")
    if cpu_cpp:
        row(" blocked", timed(blocked(lambda: ops.cg_step(*state, d, u, v, a, g, alpha=1e-3, beta=0.5, mu=3.0,
                                                          precond_mu=3.0, backend="cpp")), device, args.reps),
            t_plain, 7 * numel * 4, rate, "(blocked-torch CPU stand-in)")
    del state, x16

    anchor = torch.randn(m, n, generator=gen).bfloat16().to(device)
    experts = [(anchor.float() + 0.01 * torch.randn(m, n, generator=gen).to(device)).bfloat16()
               for _ in range(2)]
    fishers = [(torch.rand(m, n, generator=gen) ** 4).to(device) for _ in range(2)]
    kwargs = dict(u=u, v=v, lambda_align=args.lambda_align, fp64_max_numel=0, tol=args.tol)
    stats = {}

    def fast_solve():
        stats["fast"] = solve_weight(anchor, experts, fishers, backend=be, **kwargs).stats

    def plain_solve():
        problem = fisher_merge_problem(anchor, experts, fishers, weights=[0.5, 0.5])
        b = problem.metric * problem.delta_bar
        _, stats["plain_iters"] = textbook_pcg(b, problem.metric, u, v, args.lambda_align, args.tol,
                                               args.max_iter)

    t_fast = timed(fast_solve, device, max(1, args.reps // 2))
    t_plain = timed(plain_solve, device, max(1, args.reps // 2))
    st = stats["fast"]
    # fused solve: 7 passes per CG iteration + set-up (K experts, Fishers, anchor read; δ̄, D, b, x0
    # written) + 2 operator applications (4 passes each) per restart and the final KKT check.
    nbytes = (7 * st.cg_iterations + 4 * 3 + 2 * 2 * 2 + 2 * 4 + 6) * numel * 4
    row("solve", t_fast, t_plain, nbytes, rate,
        f"(CG its fast {st.cg_iterations}, plain {stats['plain_iters']}; kkt {st.kkt_residual:.1e}, "
        f"drift {st.drift:.3f})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1024x1536", help="comma-separated OUTxIN list")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--lambda-align", type=float, default=10.0)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--max-iter", type=int, default=500)
    parser.add_argument("--backend", default=None, choices=[None, "torch", "cpp", "triton"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for shape in args.shapes.split(","):
        m, n = (int(s) for s in shape.lower().split("x"))
        bench_shape(m, n, args.rank, args, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
