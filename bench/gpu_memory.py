"""On a GPU machine: the GPUs llama.cpp's backends report (inference/engine/host.py), a model's estimated GPU share
against the GPU memory its load really took, for every layer and for part of them, and a model refused by the GPU
budget before loading. Run by `bench/gpu.sh memory` after `bench/gpu.sh build`.

usage: python bench/gpu_memory.py MODEL.gguf [--n-ctx 8192] [--parallel 4] [--out FILE.json]"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.engine import ModelCache, ModelSpec, ModelUnavailable, SamplingParams
from inference.engine.host import gpu_devices, offloaded_fraction
from models_app.metadata import estimate_memory, read_gguf_metadata


def free() -> int:
    return sum(d.free for d in gpu_devices())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--n-ctx", type=int, default=8192)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--out")
    args = parser.parse_args()
    devices = gpu_devices()
    print("devices:", [d.to_dict() for d in devices])
    summary = read_gguf_metadata(args.model).summary()
    estimated = estimate_memory(summary, args.n_ctx * args.parallel)
    result = {"devices": [d.to_dict() for d in devices], "estimated_bytes": estimated, "runs": []}
    for layers in (-1, summary["block_count"] // 2):
        share = int(estimated * offloaded_fraction(layers, summary["block_count"]))
        spec = ModelSpec(name="m", path=args.model, n_ctx=args.n_ctx, n_parallel=args.parallel, n_gpu_layers=layers,
                         n_batch=2048, shared_cells=False, estimated_bytes=estimated, device_bytes=share)  # fmt: skip
        before = free()
        cache = ModelCache(budget_bytes=10**12, device_budget_bytes=int(before * 0.9))
        with cache.use(spec) as model:
            sequence = model.submit("k", model.text_prompt("Hello"), SamplingParams(max_tokens=8, ignore_eos=True))
            sequence.wait(60)
            taken = before - free()
        cache.close()
        run = {"n_gpu_layers": layers, "estimated_device_bytes": share, "measured_device_bytes": taken,
               "ratio": round(taken / share, 3) if share else None}  # fmt: skip
        print(run)
        result["runs"].append(run)
    small = ModelCache(budget_bytes=10**12, device_budget_bytes=estimated // 2)
    spec = ModelSpec(name="m", path=args.model, n_ctx=args.n_ctx, n_parallel=args.parallel, n_gpu_layers=-1,
                     shared_cells=False, estimated_bytes=estimated, device_bytes=estimated)  # fmt: skip
    before = free()
    try:
        with small.use(spec):
            result["refused"] = None
    except ModelUnavailable as exc:
        result["refused"] = str(exc)
    result["device_bytes_taken_by_the_refusal"] = before - free()
    small.close()
    print("refused:", result["refused"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
