#!/usr/bin/env python
"""Where a decode step's time goes inside the engine (no HTTP, no Redis): llama_decode, sampling and text, and
Python bookkeeping, for N sequences generating together.

    python bench/engine_profile.py --model model.gguf --parallel 1,4 [--n-gpu-layers -1]
        [--draft-max 8 [--draft-model draft.gguf]] [--greedy]

With --draft-max, "draft ms" is the drafting inside each step (prompt lookup, or the draft model's decodes).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.engine import LoadedModel, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--parallel", default="1,4")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--n-gpu-layers", type=int, default=-1)
    parser.add_argument("--draft-max", type=int, default=0, help="speculative decoding: drafts per step (0: off)")
    parser.add_argument("--draft-model", help="a draft model (else prompt lookup, with --draft-max)")
    parser.add_argument("--greedy", action="store_true", help="temperature 0 (else sampled, seeded)")
    args = parser.parse_args()
    print("| seqs | tok/s | ms/step | decode ms | sample+text ms | draft ms | python ms | accepted/drafted |")
    print("|---|---|---|---|---|---|---|---|")
    for n in [int(x) for x in args.parallel.split(",")]:
        model = LoadedModel(args.model, n_ctx=1024, n_parallel=n, n_gpu_layers=args.n_gpu_layers,
                            draft_max=args.draft_max, draft_path=args.draft_model)  # fmt: skip
        warm = model.submit("warm", model.text_prompt("Hello"), SamplingParams(max_tokens=8, ignore_eos=True))
        warm.wait()
        for key in model.stats:
            model.stats[key] = 0
        prompts = [model.text_prompt(f"Request {i}: tell a long story.") for i in range(n)]
        started = time.perf_counter()
        sampling = {"temperature": 0.0} if args.greedy else {}
        params = [SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, seed=i, **sampling) for i in range(n)]
        sequences = [model.submit(f"s{i}", prompts[i], params[i]) for i in range(n)]
        for sequence in sequences:
            sequence.wait()
        elapsed = time.perf_counter() - started
        s = model.stats
        per = 1000 / s["steps"]
        python = s["step_s"] - s["decode_s"] - s["sample_s"] - s.get("draft_s", 0)
        print(f"| {n} | {n * args.max_tokens / elapsed:.1f} | {s['step_s'] * per:.2f} | {s['decode_s'] * per:.2f} "
              f"| {s['sample_s'] * per:.3f} | {s.get('draft_s', 0) * per:.3f} | {python * per:.3f} "
              f"| {s.get('accepted', 0)}/{s.get('drafted', 0)} |")  # fmt: skip
        model.close()


if __name__ == "__main__":
    main()
