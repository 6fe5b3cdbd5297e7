"""One Fisher pass against its peers on the same model and data, each in a fresh process.

Model: random Llama (default 4 layers, width 512, vocab 4096, fp32); data: N random sequences of
T tokens, every token after the first scored. Modes:
  plain      batched forward + backward with weight gradients (what one training step costs)
  fisher     ours: frozen weights, SquaredGradCapture hooks, fused per-sample squares (batched)
  loop       autograd once per sequence, square and add the gradients
  opacus     Opacus GradSampleModule per-sample gradients (N x each tensor), squared and summed;
             LlamaRMSNorm has no Opacus grad sampler, so norms are frozen there (slightly less work)
  backpack   BackPACK SumGradSquared (only if backpack-for-pytorch imports; norms frozen likewise)
Each mode: one warm-up pass, then --reps timed passes; the table shows the best (least disturbed
by other load on the machine) and the median. Peak memory is the process's peak RSS during the passes
(VmHWM, reset just before the first) above its RSS then (model and inputs already built); with
--device cuda it is torch.cuda.max_memory_allocated during the passes above the allocation then.

  python benchmarks/fisher_vs_peers.py [--layers 4 --width 512 --vocab 4096 --n 16 --t 128 --threads 2]
                                       [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from measure import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402

MODES = ["plain", "fisher", "loop", "opacus", "backpack"]


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.width * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.width // 64,
                         num_key_value_heads=args.width // 64, max_position_embeddings=max(256, args.t),
                         tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval().to(args.device)
    ids = torch.randint(0, args.vocab, (args.n, args.t), generator=torch.Generator().manual_seed(1))
    return model, ids.to(args.device)


def nll(logits, ids):
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")


def make_pass(mode, model, ids):
    import torch

    params = dict(model.named_parameters())
    if mode == "plain":
        def run():
            for p in params.values():
                p.grad = None
            nll(model(input_ids=ids).logits, ids).backward()
        return run
    if mode == "fisher":
        from alignmerge.fisher.capture import SquaredGradCapture

        model.requires_grad_(False)
        fisher = {k: torch.zeros_like(p) for k, p in params.items()}
        cap = SquaredGradCapture(model, fisher).__enter__()

        def run():
            cap.new_batch()
            nll(model(input_ids=ids).logits, ids).backward()
            cap.finish_batch()
        return run
    if mode == "loop":
        fisher = {k: torch.zeros_like(p) for k, p in params.items()}

        def run():
            for n in range(ids.shape[0]):
                for p in params.values():
                    p.grad = None
                nll(model(input_ids=ids[n:n + 1]).logits, ids[n:n + 1]).backward()
                for k, p in params.items():
                    fisher[k].addcmul_(p.grad, p.grad)
        return run
    if mode in ("opacus", "backpack"):
        for name, module in model.named_modules():
            if "RMSNorm" in type(module).__name__:
                module.requires_grad_(False)
        trainable = {k: p for k, p in params.items() if p.requires_grad}
        fisher = {k: torch.zeros_like(p) for k, p in trainable.items()}
        if mode == "opacus":
            from opacus import GradSampleModule

            model.train()  # Opacus captures activations only in training mode (Llama has no dropout)
            wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)

            def run():
                for p in trainable.values():
                    p.grad, p.grad_sample = None, None
                nll(wrapped(input_ids=ids).logits, ids).backward()
                for k, p in trainable.items():
                    fisher[k].add_(p.grad_sample.square().sum(0))
            return run
        import backpack
        from backpack.extensions import SumGradSquared

        backpack.extend(model, use_converter=True)

        def run():
            with backpack.backpack(SumGradSquared()):
                nll(model(input_ids=ids).logits, ids).backward()
        return run
    raise ValueError(mode)


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model, ids = build(args)
    try:
        run = make_pass(args.mode, model, ids)
    except ImportError as exc:
        print(json.dumps({"mode": args.mode, "skipped": str(exc)}))
        return
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
        reset_peak_rss()
    run()  # warm-up
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"mode": args.mode, "seconds": min(times), "median": statistics.median(times), "times": times,
                      "peak_extra_bytes": peak - base, "fisher_buffer_bytes": 4 * n_params}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--t", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (peak memory: RSS on cpu, CUDA allocation on cuda)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.mode:
        child(args)
        return 0
    results = []
    passthrough = [f"--{k}={getattr(args, k)}" for k in ("layers", "width", "vocab", "n", "t", "threads", "reps", "device")]
    for mode in args.modes.split(","):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
                   PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        proc = subprocess.run([sys.executable, __file__, f"--mode={mode}", *passthrough], capture_output=True,
                              text=True, env=env)
        if proc.returncode != 0:
            results.append({"mode": mode, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    plain = next((r for r in results if r["mode"] == "plain" and "seconds" in r), None)
    print(f"Llama layers={args.layers} width={args.width} vocab={args.vocab} N={args.n} T={args.t} fp32, "
          f"{args.threads} threads, device {args.device}")
    print(f"{'mode':<10}{'best s':>10}{'x plain':>10}{'median s':>10}{'x plain':>10}{'peak MB':>10}{'- plain MB':>12}")
    for r in results:
        if "seconds" not in r:
            print(f"{r['mode']:<10}  {r.get('skipped') or r.get('error')}")
            continue
        ratio = r["seconds"] / plain["seconds"] if plain else float("nan")
        mratio = r["median"] / plain["median"] if plain else float("nan")
        extra = (r["peak_extra_bytes"] - plain["peak_extra_bytes"]) / 1e6 if plain else float("nan")
        print(f"{r['mode']:<10}{r['seconds']:>10.3f}{ratio:>10.2f}{r['median']:>10.3f}{mratio:>10.2f}"
              f"{r['peak_extra_bytes'] / 1e6:>10.0f}{extra:>12.0f}")
    if plain:
        print(f"one fp32 Fisher buffer: {plain['fisher_buffer_bytes'] / 1e6:.0f} MB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
