#!/usr/bin/env bash
# On the development machine (it has the network): the wheels that the GPU machine lacks, for its
# Python 3.12, to be carried there (it has no network). Its image already has Python 3.12.3, torch
# 2.11 (CUDA), numpy 2.5.2 and most of our needs (einops, msgpack, ninja, packaging, psutil,
# py-cpuinfo, tqdm, pyyaml, pillow, safetensors, tiktoken, pyarrow, matplotlib, pytest, hypothesis:
# jobs/gpu/image_packages.txt); so only these are carried, at the versions this .venv was tested with:
#   deepspeed          an sdist: built here into a py3-none-any wheel (its CUDA ops JIT-compile there)
#   hjson, pydantic, pydantic-core (cp312), annotated-types, typing-inspection   deepspeed's needs
#   typing-extensions  pydantic needs a recent one; installed there only if the image's is older
#   webdataset, braceexpand                                                      moma's shards/loader
# Not carried: torch and numpy (never replaced: the image's CUDA build is the point), rustbpe
# (only `moma tokenizers` trains BPE; the GPU scripts use the demo's trained tokenizers).
# jobs/gpu/env.sh installs them there with `pip --target` into a temporary site on PYTHONPATH,
# taking only what pip finds missing in the image. tests/test_gpu_recipe.py checks the recipe.
#
#   bash jobs/gpu/build_wheels.sh [OUT]      # default OUT: jobs/gpu/wheels (ignored by git)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-jobs/gpu/wheels}
py=.venv/bin/python
mkdir -p "$out"
rm -f "$out"/*.whl "$out"/requirements.txt
pin() { "$py" -c "import sys; from importlib.metadata import version; print(sys.argv[1] + '==' + version(sys.argv[1]))" "$1"; }
"$py" -m pip wheel -q --no-deps --no-build-isolation -w "$out" "$(pin deepspeed)"
# deepspeed's setup.py tags a wheel py3-none-any only when no op is prebuilt: refuse anything else
ls "$out"/deepspeed-*-py3-none-any.whl >/dev/null
deps=()
for name in hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions webdataset braceexpand; do
    deps+=("$(pin "$name")")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$out" "${deps[@]}"
# what env.sh asks pip for on the GPU machine (their dependencies resolve against the image)
{ pin deepspeed; pin webdataset; pin braceexpand; } > "$out/requirements.txt"
ls "$out"
