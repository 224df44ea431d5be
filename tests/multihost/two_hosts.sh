#!/usr/bin/env bash
# Two simulated hosts on one machine, as the README's multi-host section runs them:
# network namespaces dh0 and dh1 joined by a veth pair (10.77.0.1 <-> 10.77.0.2), each
# "host" with its own hostname and its own /dev/shm (unshare), and Open MPI's mpirun over
# TCP between them, launching the remote daemon through `ns-agent` (plm_rsh_agent) instead
# of ssh. Runs the collective selftest (2 hosts x 2 ranks), bench collectives, train with
# ZeRO-3 and a checkpoint on a directory both hosts see, then resumes that checkpoint on
# one host with 2 ranks; a checkpoint into host-local directories must be refused and
# leave nothing resumable. Prints the bytes that crossed the veth link. Everything is
# removed on exit, also on failure.
#
# Needs root (ip netns, unshare). Without it, or without mpirun, it says SKIPPED loudly
# and exits 0: it never passes silently.
set -euo pipefail
bin=${1:?usage: two_hosts.sh path/to/distoptim (built with --features mpi)}
bin=$(readlink -f "$bin")

skip() {
    echo "======================================================================"
    echo "SKIPPED: two-host MPI test: $1"
    echo "======================================================================"
    exit 0
}
[ "$(id -u)" = 0 ] || skip "needs root for ip netns and unshare"
command -v mpirun >/dev/null || skip "mpirun is not installed"
command -v ip >/dev/null || skip "iproute2 (ip) is not installed"

work=$(mktemp -d /tmp/distoptim-2hosts.XXXXXX)
cleanup() {
    set +e
    for ns in dh0 dh1; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null
        ip netns del "$ns" 2>/dev/null
    done
    ip link del dh-veth0 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
cleanup_ns_only() { for ns in dh0 dh1; do ip netns del "$ns" 2>/dev/null || true; done; }
cleanup_ns_only
ip netns add dh0 || skip "ip netns add failed (no privileges for network namespaces)"
ip netns add dh1
ip link add dh-veth0 type veth peer name dh-veth1
ip link set dh-veth0 netns dh0
ip link set dh-veth1 netns dh1
ip -n dh0 addr add 10.77.0.1/24 dev dh-veth0
ip -n dh1 addr add 10.77.0.2/24 dev dh-veth1
for ns in dh0 dh1; do
    ip -n "$ns" link set lo up
    ip -n "$ns" link set "dh-veth${ns#dh}" up
done

# "ssh" into a host: its namespace, its hostname, its own /dev/shm.
cat >"$work/ns-agent" <<'AGENT'
#!/bin/sh
host=$1; shift
case $host in
    10.77.0.1) ns=dh0; name=host0 ;;
    10.77.0.2) ns=dh1; name=host1 ;;
    *) echo "ns-agent: unknown host $host" >&2; exit 1 ;;
esac
exec ip netns exec "$ns" unshare --uts --mount sh -c "hostname $name; mount -t tmpfs tmpfs /dev/shm; mount --bind WORK/disk-$name WORK/local; $*"
AGENT
sed -i "s|WORK|$work|g" "$work/ns-agent"
chmod +x "$work/ns-agent"
# Each host's own disk, mounted at the same path $work/local on every host.
mkdir -p "$work/local" "$work/disk-host0" "$work/disk-host1"
printf '10.77.0.1 slots=2\n10.77.0.2 slots=2\n' >"$work/hosts"

# mpirun itself runs on host0.
on_host0() {
    ip netns exec dh0 unshare --uts --mount sh -c "hostname host0; mount -t tmpfs tmpfs /dev/shm; mount --bind $work/disk-host0 $work/local; cd $PWD; $*"
}
mpi="mpirun --allow-run-as-root --oversubscribe --hostfile $work/hosts -np 4 --mca plm_rsh_agent $work/ns-agent \
  --mca oob_tcp_if_include 10.77.0.0/24 --mca btl self,vader,tcp --mca btl_tcp_if_include 10.77.0.0/24 \
  -x DISTOPTIM_TIMEOUT_S=120 -x RAYON_NUM_THREADS=1"
tx() { ip -n dh0 -s link show dh-veth0 | awk '/TX:/ { getline; print $1 }'; }

echo "== two hosts: collective selftest, 2 hosts x 2 ranks"
before=$(tx)
on_host0 "$mpi $bin selftest" | tee "$work/selftest.log"
[ "$(grep -c 'collective results match the sequential reference' "$work/selftest.log")" = 4 ] || { echo "two hosts: selftest did not pass on 4 ranks" >&2; exit 1; }
grep -q "rank 3 of 4 (mpi, hierarchical (2 hosts x 2 ranks" "$work/selftest.log" || { echo "two hosts: the world all-reduce is not hierarchical" >&2; exit 1; }
echo "veth link: $(( $(tx) - before )) bytes sent by host0 during the selftest"

# Each op 7 times on S = 16 MiB (1 warm-up, 5 timed, 1 checked). Out of each of H = 2
# hosts an all-reduce must send at least 2*S*(H-1)/H = 16 MiB, a reduce-scatter or an
# all-gather S*(H-1)/H = 8 MiB; a broadcast from host0 sends S once to host1.
for mode in 1 0; do
    label=$([ $mode = 1 ] && echo hierarchical || echo flat)
    for op in all_reduce reduce_scatter all_gather broadcast; do
        bound=$(case $op in all_reduce) echo "16 MiB" ;; broadcast) echo "16 MiB (host1's one copy)" ;; *) echo "8 MiB" ;; esac)
        echo "== two hosts: bench collectives, $label $op of 16 MiB (2 hosts x 2 ranks)"
        before=$(tx)
        on_host0 "$mpi -x DISTOPTIM_MPI_HIERARCHY=$mode $bin bench collectives --ops $op --min-bytes 16M --max-bytes 16M --iters 5 --warmup 1" | tee "$work/bench.log"
        grep -q "$label" "$work/bench.log" || { echo "two hosts: expected a $label $op" >&2; exit 1; }
        sent=$(( $(tx) - before ))
        echo "veth link ($label $op): $(( sent / 7 / 1024 )) KiB sent by host0 per 16 MiB $op; lower bound $bound"
    done
done

echo "== two hosts: latency across the link (flat MPI, 1 rank per host, 16 B to 4 KB; every call's fingerprint check is one all-reduce that also carries an all-reduce's first 256 bytes, or the whole of a broadcast, all-gather or reduce-scatter of up to 256 bytes)"
printf '10.77.0.1 slots=1\n10.77.0.2 slots=1\n' >"$work/hosts1"
mpi1="mpirun --allow-run-as-root --oversubscribe --hostfile $work/hosts1 -np 2 --mca plm_rsh_agent $work/ns-agent \
  --mca oob_tcp_if_include 10.77.0.0/24 --mca btl self,vader,tcp --mca btl_tcp_if_include 10.77.0.0/24 --mca mpi_yield_when_idle 1"
on_host0 "$mpi1 -x DISTOPTIM_MPI_HIERARCHY=0 $bin bench collectives --ops all_reduce,reduce_scatter,all_gather,broadcast --min-bytes 16 --max-bytes 4K --factor 16 --iters 2000 --warmup 100"

echo "== two hosts: a checkpoint into host-local directories is refused, and leaves nothing to resume"
if on_host0 "$mpi $bin train --strategy zero3 --steps 40 --stop-at 20 --checkpoint-dir $work/local/run --out $work/run0" >"$work/local.log" 2>&1; then
    echo "two hosts: a checkpoint into host-local directories succeeded" >&2; exit 1
fi
grep -m1 "need the checkpoint directory on a filesystem they all share" "$work/local.log" || { cat "$work/local.log" >&2; exit 1; }
if "$bin" train --nproc 2 --steps 40 --resume "$work/disk-host0/run" --out "$work/run0b" >"$work/local2.log" 2>&1; then
    echo "two hosts: resumed from a half-written host-local checkpoint" >&2; exit 1
fi
grep -m1 "no complete checkpoint" "$work/local2.log" || { cat "$work/local2.log" >&2; exit 1; }

echo "== two hosts: train, ZeRO-3 on 2 hosts x 2 ranks, checkpoint at step 60"
ckpt="$work/ckpt"
before=$(tx)
on_host0 "$mpi $bin train --strategy zero3 --steps 120 --stop-at 60 --checkpoint-dir $ckpt --out $work/run1" | tee "$work/train1.log"
grep -q "written by\|checkpoint" "$work/train1.log" || true
ls "$ckpt"
echo "veth link: $(( $(tx) - before )) bytes sent by host0 during training"

echo "== one host: resume the 4-rank checkpoint on 2 shm ranks with ZeRO-1"
"$bin" train --nproc 2 --strategy zero1 --steps 120 --resume "$ckpt" --out "$work/run2" | tee "$work/train2.log"
grep -q "resumed from" "$work/train2.log" || { echo "two hosts: the resume did not happen" >&2; exit 1; }
acc=$(sed -n 's/^test accuracy \([0-9.]*\)%.*/\1/p' "$work/train2.log")
echo "two hosts: resumed run's test accuracy ${acc}%"
python3 -c "import sys; sys.exit(float('${acc:-0}') < 85)"
echo "two hosts: passed"
