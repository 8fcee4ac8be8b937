#!/usr/bin/env python
"""Where a decode step's time goes inside the engine (no HTTP, no Redis): llama_decode, sampling and text, and
Python bookkeeping, for N sequences generating together.

    python bench/engine_profile.py --model model.gguf --parallel 1,4 [--n-gpu-layers -1]
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
    args = parser.parse_args()
    print("| seqs | tok/s | ms/step | decode ms | sample+text ms | python ms |")
    print("|---|---|---|---|---|---|")
    for n in [int(x) for x in args.parallel.split(",")]:
        model = LoadedModel(args.model, n_ctx=1024, n_parallel=n, n_gpu_layers=args.n_gpu_layers)
        warm = model.submit("warm", model.text_prompt("Hello"), SamplingParams(max_tokens=8, ignore_eos=True))
        warm.wait()
        for key in model.stats:
            model.stats[key] = 0
        prompts = [model.text_prompt(f"Request {i}: tell a long story.") for i in range(n)]
        started = time.perf_counter()
        sequences = [model.submit(f"s{i}", prompts[i], SamplingParams(max_tokens=args.max_tokens, ignore_eos=True,
                                                                       seed=i)) for i in range(n)]  # fmt: skip
        for sequence in sequences:
            sequence.wait()
        elapsed = time.perf_counter() - started
        s = model.stats
        per = 1000 / s["steps"]
        python = s["step_s"] - s["decode_s"] - s["sample_s"]
        print(f"| {n} | {n * args.max_tokens / elapsed:.1f} | {s['step_s'] * per:.2f} | {s['decode_s'] * per:.2f} "
              f"| {s['sample_s'] * per:.3f} | {python * per:.3f} |")  # fmt: skip
        model.close()


if __name__ == "__main__":
    main()
