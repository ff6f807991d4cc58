# Sourced by jobs/gpu/gpu_check.sh and jobs/gpu/flops_savings.sh on the GPU machine (no network, its
# own torch/numpy): installs what the image lacks from the carried jobs/gpu/wheels
# (jobs/gpu/build_wheels.sh) into a temporary site, and maps moma into it, on PYTHONPATH.
#
#   source jobs/gpu/env.sh        # from the repository root; sets PYTHONPATH and MOMA_GPU_SITE
#
# pip decides what is missing: a dry run against the image's own environment lists the carried
# wheels whose packages are absent there or too old (typing-extensions only when the image's is
# older than pydantic needs); those, and only those, go with `--target` into the temporary site.
# The image's site-packages are never written, and torch or numpy in the plan is refused.
wheels=jobs/gpu/wheels
py=${PYTHON:-python3}
if [ ! -f "$wheels/requirements.txt" ]; then
    echo "env.sh: $wheels/requirements.txt missing: run jobs/gpu/build_wheels.sh here and carry $wheels" >&2
    return 2
fi
MOMA_GPU_SITE=$(mktemp -d)/site
mkdir -p "$MOMA_GPU_SITE"
if ! "$py" -m pip install -q --dry-run --no-index --find-links "$wheels" --report "$MOMA_GPU_SITE.plan.json" \
        -r "$wheels/requirements.txt"; then
    echo "env.sh: pip cannot resolve the carried wheels against this machine's packages (above)" >&2
    return 2
fi
if ! "$py" - "$MOMA_GPU_SITE.plan.json" > "$MOMA_GPU_SITE.files" <<'PY'
import json, sys
from urllib.parse import unquote, urlparse

plan = json.load(open(sys.argv[1]))["install"]
names = {item["metadata"]["name"].lower().replace("_", "-") for item in plan}
if names & {"torch", "numpy"}:
    sys.exit(f"env.sh: the carried wheels would replace the image's {sorted(names & {'torch', 'numpy'})}: refused")
for item in plan:
    print(unquote(urlparse(item["download_info"]["url"]).path))
PY
then
    return 2
fi
mapfile -t _carried < "$MOMA_GPU_SITE.files"
if [ "${#_carried[@]}" -gt 0 ]; then
    "$py" -m pip install -q --no-index --no-deps --target "$MOMA_GPU_SITE" "${_carried[@]}" || return 2
fi
# moma itself without an install: the package's halves mapped as pyproject.toml maps them
mkdir -p "$MOMA_GPU_SITE/moma"
for _d in pipeline tokenizers ds_configs; do ln -s "$PWD/$_d" "$MOMA_GPU_SITE/moma/$_d"; done
ln -s "$PWD/jobs/configs" "$MOMA_GPU_SITE/moma/configs"
[ ! -f moma/__init__.py ] || ln -s "$PWD/moma/__init__.py" "$MOMA_GPU_SITE/moma/__init__.py"  # moma.load
export PYTHONPATH="$MOMA_GPU_SITE${PYTHONPATH:+:$PYTHONPATH}" MOMA_GPU_SITE
echo "env.sh: installed ${#_carried[@]} carried wheel(s) into $MOMA_GPU_SITE: $(cd "$MOMA_GPU_SITE" && ls -d *.dist-info 2>/dev/null | tr '\n' ' ')"
"$py" -c "import torch, numpy, deepspeed, webdataset, moma.pipeline.training.engine as e; print('env.sh: torch', torch.__version__, 'numpy', numpy.__version__, 'deepspeed', deepspeed.__version__, 'cuda', torch.cuda.is_available())"
