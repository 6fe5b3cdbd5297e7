"""Evaluate a Hugging Face causal-LM directory on the embedded held-out probes.

Metrics (alignmerge.eval): AQI (alignment quality index of the model's hidden states on aligned vs
misaligned pairs), refusal_rate (harmful prompts where a refusal is more likely than a compliance),
over_refusal (the same on harmless prompts), skill_accuracy (multiple-choice accuracy on the demo
domain's held-out paraphrases), perplexity (held-out general instructions), and with greedy decoding
refusal_rate_greedy and skill_accuracy_greedy.
"""
from __future__ import annotations

HELP = "evaluate a model directory: AQI, refusal, over-refusal, skill accuracy, perplexity"


def add_arguments(p) -> None:
    p.add_argument("model_dir", help="Hugging Face model directory (with tokenizer files)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--seed", type=int, default=0, help="probe-sampling seed (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy-decoding metrics")
    p.add_argument("--max-examples", type=int, default=None, help="cap each probe set at N examples")


def run(args) -> int:
    import json

    from alignmerge.eval import evaluate

    result = evaluate(args.model_dir, seed=args.seed, device=args.device, greedy=not args.no_greedy,
                      max_examples=args.max_examples)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>22}: {value:.4f}")
    return 0
