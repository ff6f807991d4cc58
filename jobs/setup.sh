#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv inside this checkout and install moma into it.
#
#   bash jobs/setup.sh            # CPU path: torch==2.13.0 (CPU build), deepspeed, moma[test]
#
# GPU machines: install your CUDA build of torch into .venv first (e.g. `pip install torch`), then
# run this script with MOMA_TORCH=skip so it keeps that build. The work is skipped when nothing
# it depends on changed since the last run (a stamp file in .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.moma-setup-$(cat pyproject.toml jobs/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
    # A looser torch spec would pull a multi-GB CUDA build; the CPU build lies on this machine's disk.
    [ "${MOMA_TORCH:-cpu}" = skip ] || "${pip[@]}" "torch==2.13.0"
    "${pip[@]}" "setuptools>=68" wheel
    # deepspeed ships as an sdist whose setup.py imports torch: build it against the torch above.
    "${pip[@]}" --no-build-isolation "deepspeed==0.19.8"
    "${pip[@]}" -e ".[test,tensorboard]"
    rm -f .venv/.moma-setup-*
    touch "$stamp"
fi

# DeepSpeed JIT-compiles a shared-memory collective op at its first init_distributed on CPU
# (~1 min). Build it once here, into torch's persistent extension cache, so that launches and
# tests do not each wait for it (or race to build it).
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    DS_ACCELERATOR=cpu .venv/bin/python -c "
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
ShareMemCommBuilder().load(verbose=False)" >/dev/null 2>&1 || echo "setup: note: could not prebuild DeepSpeed's shm op" >&2
fi
.venv/bin/python - <<'PY'
from importlib.metadata import version
print(f"setup: .venv ready (torch {version('torch')}, deepspeed {version('deepspeed')}, moma {version('moma')})")
PY
