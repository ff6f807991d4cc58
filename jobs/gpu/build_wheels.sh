#!/usr/bin/env bash
# On the development machine (it has the network): the wheels a GPU machine without network needs for
# jobs/gpu/gpu_check.sh and jobs/gpu/flops_savings.sh — deepspeed (an sdist: built here, its CUDA ops
# are JIT-compiled later) and the dependencies the GPU machine's torch environment lacks. They go to jobs/gpu/wheels/
# (ignored by git; pass it to the device tool as a carried path).
#
#   bash jobs/gpu/build_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
out=jobs/gpu/wheels
mkdir -p "$out"
.venv/bin/python -m pip wheel -q --no-build-isolation --no-deps -w "$out" "deepspeed==0.19.8"
.venv/bin/python -m pip download -q --only-binary=:all: --python-version 3.11 --no-deps -d "$out" \
    hjson ninja py-cpuinfo pydantic pydantic-core annotated-types typing-inspection typing-extensions \
    msgpack einops safetensors pyyaml psutil packaging tqdm numpy tiktoken regex requests braceexpand \
    matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six pillow \
    urllib3 idna charset-normalizer certifi
ls "$out"
