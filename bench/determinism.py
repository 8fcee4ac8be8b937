#!/usr/bin/env python
"""Does a sequence's text depend on its batch mates? Runs N seeded requests one at a time, then all N at once in
one scheduler, and counts how many texts differ. On the CPU they must all match (tests assert it); on a GPU
llama.cpp's kernels may round differently with batch size, so this measures how often that changes the text.

    python bench/determinism.py --model model.gguf --parallel 16 [--n-gpu-layers -1]
"""

import argparse
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.engine import LoadedModel, SamplingParams


class Collect:
    def __init__(self):
        self.texts: dict[str, list[str]] = {}
        self.lock = threading.Lock()

    def step(self, events, active):
        with self.lock:
            for sequence, event, data in events:
                if event == "token":
                    self.texts.setdefault(sequence.key, []).append(data["text"])
        return set()


def _first_difference(a: list[str], b: list[str]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--n-gpu-layers", type=int, default=-1)
    parser.add_argument("--temperature", type=float, default=0.8)
    args = parser.parse_args()
    io = Collect()
    model = LoadedModel(args.model, n_ctx=512, n_parallel=args.parallel, n_gpu_layers=args.n_gpu_layers, io=io)
    prompts = [model.text_prompt(f"Request {i}: write about the number {i}.") for i in range(args.parallel)]
    params = [SamplingParams(temperature=args.temperature, seed=i, max_tokens=args.max_tokens, ignore_eos=True)
              for i in range(args.parallel)]  # fmt: skip
    for i in range(args.parallel):
        model.submit(f"alone-{i}", prompts[i], params[i]).wait()
    together = [model.submit(f"together-{i}", prompts[i], params[i]) for i in range(args.parallel)]
    for sequence in together:
        sequence.wait()
    differ = [i for i in range(args.parallel) if io.texts[f"alone-{i}"] != io.texts[f"together-{i}"]]
    first = [_first_difference(io.texts[f"alone-{i}"], io.texts[f"together-{i}"]) for i in differ]
    print(f"{len(differ)}/{args.parallel} sequences differ when batched with {args.parallel - 1} others "
          f"(temperature {args.temperature}, {args.max_tokens} tokens); first differing token: {first}")  # fmt: skip
    model.close()


if __name__ == "__main__":
    main()
