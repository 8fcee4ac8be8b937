#!/usr/bin/env bash
# Run bench/bench.py on the lent GPU machine (no network there). Prepare the carry here first with
# `bench/gpu.sh prepare` (bench/make_synthetic_llama.py, a trimmed llama.cpp source, llama-cpp-python's Python files and Python 3.12 wheels
# under build/gpu/, about 42 MiB), then on the device: `bench/gpu.sh build` and `bench/gpu.sh run [LEVELS]`, or
# `bench/gpu.sh batch [SLOTS]` for bench/batch_ttft.py (interactive TTFT while a batch runs), or
# `bench/gpu.sh embed [INPUTS]` for bench/embed_compare.py (embedding throughput against llama-server).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=build/gpu
LLAMA_VERSION=$(sed -n 's/^llama-cpp-python==//p' requirements/base.txt)

case "${1:-}" in
prepare)
    rm -rf "$CARRY" && mkdir -p "$CARRY/src"
    pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_VERSION" -d "$CARRY/src"
    tar xzf "$CARRY"/src/llama_cpp_python-*.tar.gz -C "$CARRY/src"
    sdist=$(ls -d "$CARRY"/src/llama_cpp_python-*/)
    vendor="$sdist/vendor/llama.cpp"
    rm -rf "$vendor"/{.git,docs,media,benches,tests,pocs,conversion} "$vendor"/examples/*/ "$vendor"/models/templates
    rm -rf "$vendor"/tools/ui/{src,tests}  # the web UI's sources: not built (no npm there), 8 MiB
    rm -f "$vendor"/models/*.inp "$vendor"/models/*.out
    for arch in arm loongarch powerpc riscv s390 wasm; do rm -rf "$vendor/ggml/src/ggml-cpu/arch/$arch"; done
    find "$vendor/models" -name '*.gguf' ! -name ggml-vocab-llama-bpe.gguf -delete
    for backend in vulkan sycl metal opencl cann hexagon openvino webgpu et virtgpu zdnn zendnn musa hip rpc blas; do
        rm -rf "$vendor/ggml/src/ggml-$backend"
    done
    tar cJf "$CARRY/llama.cpp.tar.xz" -C "$sdist/vendor" llama.cpp
    mkdir -p "$CARRY/py" && cp -r "$sdist/llama_cpp" "$CARRY/py/"
    # Not the docs page's ReDoc bundle (2.6 MiB; the tree plus carry must stay under 64 MiB): `build` leaves an empty
    # package in its place, enough for INSTALLED_APPS.
    # Nor hf-xet (4 MiB; huggingface_hub's Xet transfers, which `models pull` does not use): `build` installs
    # huggingface_hub, filelock and fsspec without their dependencies.
    grep -vE '^(#|$)|llama-cpp-python|psycopg|drf-spectacular-sidecar|huggingface-hub' requirements/base.txt \
        > "$CARRY/requirements.txt"
    echo "diskcache==5.6.3" >> "$CARRY/requirements.txt"
    echo "httpx==0.28.1" >> "$CARRY/requirements.txt"  # the benches' client (httpx2 is the tests' pin)
    pip download -q --no-deps -d "$CARRY/wheels" "$(grep '^huggingface-hub==' requirements/base.txt | cut -d' ' -f1)" \
        filelock fsspec httpx2 httpcore2 truststore
    pip download -q --python-version 3.12 --implementation cp --only-binary=:all: \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_34_x86_64 -d "$CARRY/wheels" -r "$CARRY/requirements.txt"
    rm -f "$CARRY"/wheels/numpy-*.whl  # 16 MiB; the machine's python3 has numpy, which the venv sees
    pip download -q --no-deps -d "$CARRY/wheels" py-spy  # `cpu`: where the servers' processes spend the CPU
    cp bench/make_synthetic_llama.py "$CARRY/"
    rm -rf "$CARRY/src"
    du -sh "$CARRY"
    ;;
build)  # CUDA llama.cpp into /tmp/lbuild, a venv in /tmp/venv, an 8B Q4_K_M model in /tmp/m-q4km.gguf
    mkdir -p /tmp/w && tar xJf "$CARRY/llama.cpp.tar.xz" -C /tmp/w
    # ~400 s. (The compiled binaries, xz-compressed, are 44 MiB: with the wheels they do not fit a 64 MiB carry.)
    cmake -B /tmp/lbuild -S /tmp/w/llama.cpp -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DGGML_CUDA_NCCL=OFF -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_TYPE=Release > /tmp/cmake.log
    cmake --build /tmp/lbuild -j16 --target llama llama-server llama-quantize > /tmp/build.log
    python3 -m venv --system-site-packages /tmp/venv
    # numpy is not in the carry: link the machine's (its python3 may itself be a venv, whose packages a venv made
    # from it does not see).
    site=$(/tmp/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    if ! /tmp/venv/bin/python -c 'import numpy' 2>/dev/null; then
        numpy_site=$(python3 -c 'import numpy, os; print(os.path.dirname(os.path.dirname(numpy.__file__)))')
        ln -sf "$numpy_site"/numpy "$numpy_site"/numpy-*.dist-info "$site"/
        [ -d "$numpy_site/numpy.libs" ] && ln -sf "$numpy_site/numpy.libs" "$site"/
    fi
    /tmp/venv/bin/pip install -q --no-index --find-links "$CARRY/wheels" -r "$CARRY/requirements.txt"
    /tmp/venv/bin/pip install -q --no-index --no-deps --find-links "$CARRY/wheels" huggingface-hub filelock fsspec httpx2 httpcore2 truststore \
        py-spy
    sidecar=$site/drf_spectacular_sidecar
    mkdir -p "$sidecar" && touch "$sidecar/__init__.py"
    PYTHONPATH=/tmp/w/llama.cpp/gguf-py python3 "$CARRY/make_synthetic_llama.py" \
        /tmp/w/llama.cpp/models/ggml-vocab-llama-bpe.gguf /tmp/m-f16.gguf 8b
    /tmp/lbuild/bin/llama-quantize /tmp/m-f16.gguf /tmp/m-q4km.gguf Q4_K_M 16 > /tmp/quantize.log
    rm -f /tmp/m-f16.gguf
    ls -la /tmp/m-q4km.gguf
    ;;
run)
    export PYTHONPATH="$PWD/$CARRY/py" LLAMA_CPP_LIB_PATH=/tmp/lbuild/bin LD_LIBRARY_PATH=/tmp/lbuild/bin
    /tmp/venv/bin/python bench/bench.py --llama-server /tmp/lbuild/bin/llama-server --model /tmp/m-q4km.gguf \
        --levels "${2:-1,4,16,64}" --n-batch 2048 --n-ctx 1024 --out "${OUT:-/tmp}/bench-gpu.json"
    ;;
prefix)  # 16 agents arriving together with one ~3k-token system prompt, 64 tokens out each
    export PYTHONPATH="$PWD/$CARRY/py" LLAMA_CPP_LIB_PATH=/tmp/lbuild/bin LD_LIBRARY_PATH=/tmp/lbuild/bin
    /tmp/venv/bin/python bench/bench.py --llama-server /tmp/lbuild/bin/llama-server --model /tmp/m-q4km.gguf \
        --levels "${2:-16}" --requests "${2:-16}" --shared-prefix 2300 --max-tokens 64 --n-batch 2048 --n-ctx 4096 \
        --out "${OUT:-/tmp}/prefix-gpu.json"
    ;;
agents)  # 32 conversations of ~3k tokens on 16 slots, each continued twice: a slot's prompt leaves and comes back
    export PYTHONPATH="$PWD/$CARRY/py" LLAMA_CPP_LIB_PATH=/tmp/lbuild/bin LD_LIBRARY_PATH=/tmp/lbuild/bin
    /tmp/venv/bin/python bench/bench.py --llama-server /tmp/lbuild/bin/llama-server --model /tmp/m-q4km.gguf \
        --levels 16 --requests 64 --conversations 32 --prompt-words 2300 --max-tokens 64 --n-batch 2048 \
        --n-ctx 4096 --out "${OUT:-/tmp}/agents-gpu.json"
    ;;
long)  # 16 clients with distinct ~5k-token prompts, 128 tokens out each
    export PYTHONPATH="$PWD/$CARRY/py" LLAMA_CPP_LIB_PATH=/tmp/lbuild/bin LD_LIBRARY_PATH=/tmp/lbuild/bin
    /tmp/venv/bin/python bench/bench.py --llama-server /tmp/lbuild/bin/llama-server --model /tmp/m-q4km.gguf \
        --levels 16 --requests 16 --prompt-words 3800 --max-tokens 128 --n-batch 2048 --n-ctx 8192 \
        --out "${OUT:-/tmp}/long-gpu.json"
    ;;
profile)  # issue 18's step profile: the engine alone at 1 and 64 sequences, then both servers at c=1 and c=64
    export PYTHONPATH="$PWD/$CARRY/py" LLAMA_CPP_LIB_PATH=/tmp/lbuild/bin LD_LIBRARY_PATH=/tmp/lbuild/bin
    /tmp/venv/bin/python bench/engine_profile.py --model /tmp/m-q4km.gguf --parallel 1,64
    /tmp/venv/bin/python bench/bench.py --llama-server /tmp/lbuild/bin/llama-server --model /tmp/m-q4km.gguf \
        --levels 1,64 --n-batch 2048 --n-ctx 1024 --out "${OUT:-/tmp}/profile-gpu.json"
    ;;
edit)  # the edit workload with prompt-lookup drafting on both servers (random weights: drafts rarely hold)
    export PYTHONPATH="$PWD/$CARRY/py" LLAMA_CPP_LIB_PATH=/tmp/lbuild/bin LD_LIBRARY_PATH=/tmp/lbuild/bin
    /tmp/venv/bin/python bench/bench.py --llama-server /tmp/lbuild/bin/llama-server --model /tmp/m-q4km.gguf \
        --levels "${2:-1,16}" --edit --max-tokens 256 --n-batch 2048 --n-ctx 2048 \
        --minerva-env MINERVA_SPECULATIVE_DRAFT=8 --llama-server-arg=--spec-type --llama-server-arg=ngram-simple \
        --llama-server-arg=--spec-ngram-simple-size-n --llama-server-arg=3 \
        --llama-server-arg=--spec-ngram-simple-size-m --llama-server-arg=8 \
        --out "${OUT:-/tmp}/edit-gpu.json"
    ;;
draft)  # a draft model on both servers: an 8B whose layers 2.. add nothing, drafted for by its first two layers
    # (greedy drafts that hold but for rounding near-ties, ~85% on the CPU: speculative decoding's best case), then the
    # same target without drafting. Needs a carry prepared with make_synthetic_llama.py's shifted repeats and a fresh
    # /tmp/draft: a pair made before them has tied logits, and llama-server keeps 8% of its drafts.
    # `--pure`: one quantization type throughout, so that both files' first layers round alike.
    export PYTHONPATH="$PWD/$CARRY/py" LLAMA_CPP_LIB_PATH=/tmp/lbuild/bin LD_LIBRARY_PATH=/tmp/lbuild/bin
    if [ ! -f /tmp/draft/target.gguf ]; then
        mkdir -p /tmp/draft
        for kind in "target --live-layers 2" "draft --layers 2"; do
            set -- $kind
            PYTHONPATH=/tmp/w/llama.cpp/gguf-py python3 "$CARRY/make_synthetic_llama.py" \
                /tmp/w/llama.cpp/models/ggml-vocab-llama-bpe.gguf /tmp/draft/f16.gguf 8b "${@:2}"
            /tmp/lbuild/bin/llama-quantize --pure /tmp/draft/f16.gguf "/tmp/draft/$1.gguf" Q4_K_M 16 > /tmp/quantize.log
            rm /tmp/draft/f16.gguf
        done
    fi
    for draft in "--draft-model /tmp/draft/draft.gguf" ""; do
        /tmp/venv/bin/python bench/bench.py --llama-server /tmp/lbuild/bin/llama-server --model /tmp/draft/target.gguf \
            --levels "${LEVELS:-1,16}" --edit --max-tokens 256 --n-batch 2048 --n-ctx 2048 $draft \
            --out "${OUT:-/tmp}/draft-gpu${draft:+-on}.json"
    done
    ;;
cpu)  # where the CPU goes at c=64, Minerva's level: each process's and the worker's threads' CPU, py-spy profiles
    export PYTHONPATH="$PWD/$CARRY/py" LLAMA_CPP_LIB_PATH=/tmp/lbuild/bin LD_LIBRARY_PATH=/tmp/lbuild/bin
    out=${OUT:-/tmp}
    /tmp/venv/bin/python bench/bench.py --llama-server /tmp/lbuild/bin/llama-server --model /tmp/m-q4km.gguf \
        --levels 64 --requests "${2:-256}" --n-batch 2048 --n-ctx 1024 --out "$out/cpu-gpu.json" \
        "${@:3}" > "$out/cpu-bench.log" 2>&1 &
    bench=$!
    until grep -q "llama-server c=64" "$out/cpu-bench.log" || ! kill -0 $bench 2>/dev/null; do sleep 0.5; done
    sleep 6
    worker=$(pgrep -f "celery -A minerva_project worker" | head -1)
    web=$(pgrep -f "minerva_project.daphne" | tr '\n' ',' | sed 's/,$//')
    top -b -n 2 -d 4 -w 250 > "$out/top.txt" &
    top -b -H -n 2 -d 4 -w 250 -p "$worker" > "$out/top-worker-threads.txt" &
    /tmp/venv/bin/py-spy record -p "$worker" -d 10 -r 200 -f raw --threads --nonblocking -o "$out/pyspy-worker.txt" \
        > /dev/null 2>&1 &
    for pid in ${web//,/ }; do
        /tmp/venv/bin/py-spy record -p "$pid" -d 10 -r 200 -f raw --nonblocking -o "$out/pyspy-web-$pid.txt" > /dev/null 2>&1 &
    done
    wait $bench
    wait
    tail -20 "$out/cpu-bench.log"
    ;;
sampling)  # c=1 and c=64 with sampling in the graph on both servers (MINERVA_BACKEND_SAMPLING, --backend-sampling)
    export PYTHONPATH="$PWD/$CARRY/py" LLAMA_CPP_LIB_PATH=/tmp/lbuild/bin LD_LIBRARY_PATH=/tmp/lbuild/bin
    /tmp/venv/bin/python bench/bench.py --llama-server /tmp/lbuild/bin/llama-server --model /tmp/m-q4km.gguf \
        --levels "${2:-1,64}" --n-batch 2048 --n-ctx 1024 --minerva-env MINERVA_BACKEND_SAMPLING=on \
        --llama-server-arg=--backend-sampling --out "${OUT:-/tmp}/sampling-gpu.json"
    ;;
batch)
    export PYTHONPATH="$PWD/$CARRY/py" LLAMA_CPP_LIB_PATH=/tmp/lbuild/bin LD_LIBRARY_PATH=/tmp/lbuild/bin
    /tmp/venv/bin/python bench/batch_ttft.py --llama-server /tmp/lbuild/bin/llama-server --model /tmp/m-q4km.gguf \
        --slots "${2:-16}" --n-batch 2048 --n-ctx 1024 --lines 500 --max-tokens 64 --out "${OUT:-/tmp}/batch-gpu.json"
    ;;
embed)
    export PYTHONPATH="$PWD/$CARRY/py" LLAMA_CPP_LIB_PATH=/tmp/lbuild/bin LD_LIBRARY_PATH=/tmp/lbuild/bin
    /tmp/venv/bin/python bench/embed_compare.py --llama-server /tmp/lbuild/bin/llama-server --model /tmp/m-q4km.gguf \
        --inputs "${2:-256}" --out "${OUT:-/tmp}/embed-gpu.json"
    ;;
memory)  # bench/gpu_memory.py: the GPUs llama.cpp reports, estimated vs measured GPU memory, a budget refusal
    export PYTHONPATH="$PWD/$CARRY/py" LLAMA_CPP_LIB_PATH=/tmp/lbuild/bin LD_LIBRARY_PATH=/tmp/lbuild/bin
    /tmp/venv/bin/python bench/gpu_memory.py /tmp/m-q4km.gguf --out "${OUT:-/tmp}/gpu-memory.json"
    ;;
*)
    echo "usage: bench/gpu.sh prepare|build|cpu [REQUESTS [BENCH ARGS]]|run [LEVELS]|sampling [LEVELS]|prefix [N]|agents|long|profile|edit [LEVELS]|draft|batch [SLOTS]|embed [INPUTS]|memory" >&2
    exit 2
    ;;
esac
