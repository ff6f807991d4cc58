#!/usr/bin/env bash
# Train on several nodes with the deepspeed launcher and a hostfile (passwordless ssh between nodes,
# pdsh on this node, the same checkout and .venv path on every node, shards on a shared filesystem).
#
#   bash jobs/train_multinode.sh HOSTFILE CONFIG.yaml [KEY=VALUE ...]
#
# HOSTFILE lines look like "node01 slots=8"; the first host is the master (rank 0's rendezvous). The
# config is checked for the total slot count first. The remote ranks start from a bare ssh login:
# they get only what DeepSpeed's runner reads from `.deepspeed_env` (in this directory or ~; or the
# file named by DS_ENV_FILE): without PATH to the venv, DS_ACCELERATOR, OMP_NUM_THREADS and the
# socket interface for gloo / NCCL they pick the wrong accelerator, a thread per core, or an
# interface that cannot reach the master. So if no such file exists this writes ./.deepspeed_env
# (the interface: the one this node reaches the master on; set GLOO_SOCKET_IFNAME /
# NCCL_SOCKET_IFNAME / OMP_NUM_THREADS here to choose), and if one exists it is checked for those
# keys (an error names the file and the key). Test: tests/test_cluster_ssh.py (sshd on loopback).
set -euo pipefail
hostfile=${1:?usage: train_multinode.sh HOSTFILE CONFIG [KEY=VALUE ...]}
config=${2:?usage: train_multinode.sh HOSTFILE CONFIG [KEY=VALUE ...]}
shift 2
bin=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin
world=$(awk '/slots=/{split($2, a, "="); s += a[2]} END {print s}' "$hostfile")
master=$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")
[ -n "$master" ] || { echo "train_multinode.sh: $hostfile lists no host" >&2; exit 2; }
me="train_multinode.sh"

has_cuda() { "$bin/python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; }
name=${DS_ENV_FILE:-.deepspeed_env}
files=()  # what DeepSpeed's runner reads, in its order (a later file's key wins)
for f in "$HOME/$name" "$name"; do
    case $name in /*) f=$name ;; esac
    [ -f "$f" ] && [[ ! " ${files[*]-} " =~ " $f " ]] && files+=("$f")
done
if [ ${#files[@]} = 0 ]; then
    if has_cuda; then cuda=1; else cuda=0; fi
    iface=${GLOO_SOCKET_IFNAME:-${NCCL_SOCKET_IFNAME:-$("$bin/python" - "$master" <<'PY'
import ipaddress, socket, sys
import psutil
# The interface this node reaches the master on: the source address of a route to it (a UDP
# connect sends nothing), then the interface whose network holds that address.
ip = socket.gethostbyname(sys.argv[1])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.connect((ip, 9))
    local = ipaddress.ip_address(s.getsockname()[0])
for name, addrs in psutil.net_if_addrs().items():
    for a in addrs:
        if a.family == socket.AF_INET and a.netmask and local in ipaddress.ip_network(f"{a.address}/{a.netmask}",
                                                                                         strict=False):
            print(name)
            sys.exit(0)
sys.exit(f"no interface holds {local}, this node's address towards the master {sys.argv[1]} ({ip})")
PY
)}}
    if [ "$cuda" = 1 ]; then
        slots=$(awk -v m="$master" '$1 == m {split($2, a, "="); print a[2]; exit}' "$hostfile")
        per_rank=$(( $(getconf _NPROCESSORS_ONLN) / ${slots:-1} ))  # not nproc: it honours OMP_NUM_THREADS
        threads=${OMP_NUM_THREADS:-$(( per_rank > 0 ? per_rank : 1 ))}
    else
        threads=${OMP_NUM_THREADS:-1}
    fi
    case $name in /*) out=$name ;; *) out=./$name ;; esac
    {   # KEY=VALUE lines only: the runner splits every line at its first "=" (a blank line breaks it)
        # this shell's PATH (the remote ranks find the same tools as a local launch: a different
        # ninja first on PATH rebuilds DeepSpeed's prebuilt ops, minutes) with the venv's bin added
        case ":$PATH:" in *":$bin:"*) echo "PATH=$PATH" ;; *) echo "PATH=$PATH:$bin" ;; esac
        [ "$cuda" = 1 ] || echo "DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}"
        echo "OMP_NUM_THREADS=$threads"
        echo "GLOO_SOCKET_IFNAME=$iface"
        echo "NCCL_SOCKET_IFNAME=$iface"
    } > "$out.tmp.$$"
    mv "$out.tmp.$$" "$out"
    echo "$me: wrote $out for the remote ranks: PATH (with $bin), $( [ "$cuda" = 1 ] || echo "DS_ACCELERATOR, ")OMP_NUM_THREADS=$threads, GLOO_SOCKET_IFNAME=NCCL_SOCKET_IFNAME=$iface" >&2
else
    need=(PATH OMP_NUM_THREADS)
    for f in "${files[@]}"; do
        n=0
        while IFS= read -r line || [ -n "$line" ]; do
            n=$((n + 1))
            [[ $line == *=* ]] || { echo "$me: $f line $n is not KEY=VALUE (DeepSpeed's runner fails on it): '$line'" >&2; exit 2; }
        done < "$f"
    done
    for key in "${need[@]}"; do
        grep -q "^[[:space:]]*$key=" "${files[@]}" || {
            echo "$me: ${files[*]} lacks $key (the remote ranks get only what it carries): add it, or remove the file to have it written" >&2
            exit 2; }
    done
    grep -q "^[[:space:]]*\(GLOO\|NCCL\)_SOCKET_IFNAME=" "${files[@]}" || {
        echo "$me: ${files[*]} lacks GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME (the interface the ranks reach the master on): add it, or remove the file to have it written" >&2
        exit 2; }
    grep -q "^[[:space:]]*PATH=.*$bin" "${files[@]}" || {
        echo "$me: ${files[*]}: PATH does not hold $bin (the venv every node must have at this path): add it, or remove the file to have it written" >&2
        exit 2; }
    grep -q "^[[:space:]]*DS_ACCELERATOR=" "${files[@]}" || has_cuda || {  # without CUDA: DeepSpeed must be told
        echo "$me: ${files[*]} lacks DS_ACCELERATOR (=cpu on nodes without CUDA): add it, or remove the file to have it written" >&2
        exit 2; }
fi

"$bin/python" -m moma.pipeline.cli train "$config" "$@" --check --world-size "$world"
exec "$bin/deepspeed" --hostfile "$hostfile" --master_addr "$master" --master_port "${MASTER_PORT:-29500}" \
    --module moma.pipeline.cli train "$config" "$@" --resume auto
