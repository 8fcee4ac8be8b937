#!/usr/bin/env python3
# Copied from the workspace's shared/gpu/ so that bench/gpu.sh needs nothing outside the repository.
"""Write a random-weight Llama-architecture GGUF (F16) for speed benchmarks.

The tokenizer is copied from a vocab-only GGUF (llama.cpp's ggml-vocab-llama-bpe.gguf),
so prompts tokenize like Llama 3; the weights are noise, so only timings mean anything.

usage: make_synthetic_llama.py VOCAB.gguf OUT.gguf [tiny|1b|8b] [--layers N] [--live-layers K]
needs gguf-py on PYTHONPATH.

A draft model that predicts its target exactly (speculative decoding's best case, for speed only): the target with
`--live-layers 2` (layers 2.. write zeros into the residual stream: their attention and FFN outputs are zero, but they
are computed) and the draft with `--layers 2`. Every tensor of one shape holds the same noise, so the two share
their embeddings, first two layers and output: the draft's logits are the target's, at a fraction of the work.
(Up to rounding: the target verifies a step's drafts in one batch, whose kernels round otherwise than the draft's
one-token steps, and these logits are flat, about N(0, 0.02^2 * n_embd) over 128k tokens, so a few in a hundred
near-ties flip: about 85% of the drafts hold on both servers.)

A tensor larger than the noise pool (token_embd and output of 1b and 8b) is the pool repeated, each repeat shifted
by one more element: repeated unshifted, output's rows would repeat every pool/n_embd rows (16384 in 8b), every
logit would be tied with 3 (1b) or 7 (8b) others, and greedy decoding would depend on how each sampler breaks
ties (llama-server's draft top-k 10 and target top-k 40 break them differently: 8% of its drafts held).
"""

import argparse

import gguf
import numpy as np

SHAPES = {
    # n_layer, n_embd, n_head, n_head_kv, n_ff
    "tiny": (2, 256, 4, 2, 512),
    "1b": (16, 2048, 32, 8, 8192),
    "8b": (32, 4096, 32, 8, 14336),
}

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("vocab_path")
    parser.add_argument("out_path")
    parser.add_argument("size", nargs="?", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, help="this many layers instead of the shape's")
    parser.add_argument("--live-layers", type=int, help="layers from this one on add nothing to the residual stream")
    args = parser.parse_args()
    vocab_path, out_path, size = args.vocab_path, args.out_path, args.size
    n_layer, n_embd, n_head, n_head_kv, n_ff = SHAPES[size]
    n_layer = args.layers or n_layer
    live = n_layer if args.live_layers is None else args.live_layers
    head_dim = n_embd // n_head
    src = gguf.GGUFReader(vocab_path)
    tokens = [
        bytes(src.fields["tokenizer.ggml.tokens"].parts[i]).decode("utf-8", "replace")
        for i in src.fields["tokenizer.ggml.tokens"].data
    ]
    types = [
        int(src.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in src.fields["tokenizer.ggml.token_type"].data
    ]
    merges = [
        bytes(src.fields["tokenizer.ggml.merges"].parts[i]).decode("utf-8", "replace")
        for i in src.fields["tokenizer.ggml.merges"].data
    ]
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(out_path, "llama")
    w.add_name(f"synthetic-llama-{size}-{n_layer}l" + (f"-{live}live" if live < n_layer else ""))
    w.add_block_count(n_layer)
    w.add_context_length(8192)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(128000)
    w.add_eos_token_id(128009)
    w.add_chat_template(LLAMA3_TEMPLATE)

    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(64 * 1024 * 1024, dtype=np.float32) * 0.02).astype(np.float16)

    def noise(*shape):
        n = int(np.prod(shape))
        reps = -(-n // pool.size)
        if reps == 1:
            return pool[:n].reshape(shape)
        # Not np.tile: its repeats would make rows pool.size / shape[-1] apart equal (tied logits, see above).
        flat = np.concatenate([np.roll(pool, k) for k in range(reps)])[:n]
        return flat.reshape(shape)

    def zeros(*shape):
        return np.zeros(shape, dtype=np.float16)

    def ones(n):
        return np.ones(n, dtype=np.float32)

    kv = n_head_kv * head_dim
    w.add_tensor("token_embd.weight", noise(n_vocab, n_embd))
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones(n_embd))
        w.add_tensor(p + "attn_q.weight", noise(n_embd, n_embd))
        w.add_tensor(p + "attn_k.weight", noise(kv, n_embd))
        w.add_tensor(p + "attn_v.weight", noise(kv, n_embd))
        w.add_tensor(p + "attn_output.weight", (noise if i < live else zeros)(n_embd, n_embd))
        w.add_tensor(p + "ffn_norm.weight", ones(n_embd))
        w.add_tensor(p + "ffn_gate.weight", noise(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", noise(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", (noise if i < live else zeros)(n_embd, n_ff))
    w.add_tensor("output_norm.weight", ones(n_embd))
    w.add_tensor("output.weight", noise(n_vocab, n_embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print("wrote", out_path)


if __name__ == "__main__":
    main()
