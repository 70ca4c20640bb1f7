# shellcheck shell=bash
# The VM lab's runtime, sourced by scripts/vm-lab: accelerator probe, VMs on a private network
# in a network namespace, the qemu-guest-agent control channel, steps with timings, and the
# artifacts kept when a test fails. Tests are scripts/vm-lab.d/test-NAME, sourced after this.
#
# Safety: the host freezes nothing. Every freeze a test makes happens inside a VM, on a virtio
# disk of that VM; a VM left frozen is killed with its qemu. Network: the VMs' NICs are taps on
# a bridge inside the lab's own network namespace; that namespace has no other interface up
# but lo, so nothing leaves it.

LAB_D=$LAB_REPO/scripts/vm-lab.d
QGA=$LAB_D/qga.py
LAB_TESTS=(packages last-resort partition btrfs-root)
LAB_TEST=
LAB_ACCEL=

T0_MS=$(date +%s%3N)
now_ms() { date +%s%3N; }
elapsed() { printf '%5.1fs' "$(awk -v a="$(now_ms)" -v b="$T0_MS" 'BEGIN { print (a - b) / 1000 }')"; }
log() { printf '==> [%s] %s\n' "$(elapsed)" "$*" >&2; }
pass() { printf '    ok: %s\n' "$*" >&2; PASSED=$((PASSED + 1)); }
fail() { printf 'vm-lab: FAILED: %s\n' "$*" >&2; exit 1; }
PASSED=0

# ------------------------------------------------------------------ steps ----
STEPS=()
STEP=
STEP_T0=
step_end() {
    [[ -n $STEP ]] || return 0
    STEPS+=("$(printf '%7.1fs  %s' "$(awk -v a="$(now_ms)" -v b="$STEP_T0" 'BEGIN { print (a - b) / 1000 }')" "$STEP")")
    STEP=
}
step() { step_end; STEP=$*; STEP_T0=$(now_ms); log "$*"; }
steps_summary() {
    step_end
    local s
    echo "---- step timings ($LAB_TEST, accelerator $LAB_ACCEL)" >&2
    for s in "${STEPS[@]}"; do echo "$s" >&2; done
}

# ------------------------------------------------------------ environment ----
# lab_unavailable WHY: skip outside CI, fail under CI=true.
lab_unavailable() {
    if [[ ${CI:-} == true ]]; then fail "the VM lab cannot run here and CI=true: $*"; fi
    echo "skipping: the VM lab cannot run here ($*)" >&2
    exit 0
}
lab_require() {
    [[ $(id -u) == 0 ]] || lab_unavailable "needs root (network namespace, taps, image build)"
    [[ -c /dev/net/tun ]] || lab_unavailable "no /dev/net/tun"
    "$LAB_REPO/scripts/vm-lab" deps || lab_unavailable "cannot install qemu and debootstrap"
    command -v qemu-system-x86_64 >/dev/null || lab_unavailable "no qemu-system-x86_64"
}

# lab_accel: kvm when a probe guest really boots under KVM, else tcg. A KVM guest here can hang
# right after the BIOS (nested virtualisation), so the probe boots the lab's kernel and waits
# for its first line on the serial console. Cached per host boot; VM_LAB_ACCEL overrides.
lab_accel() {
    local image=$1 cache boot_id out pid i
    if [[ -n ${VM_LAB_ACCEL:-} ]]; then echo "$VM_LAB_ACCEL"; return; fi
    boot_id=$(cat /proc/sys/kernel/random/boot_id)
    cache=$VM_LAB_CACHE/accel.$boot_id
    if [[ -f $cache ]]; then cat "$cache"; return; fi
    local accel=tcg
    if [[ -r /dev/kvm && -w /dev/kvm ]]; then
        out=$(mktemp)
        qemu-system-x86_64 -accel kvm -m 256 -nodefaults -display none -no-reboot \
            -kernel "$image/vmlinuz" -append "console=ttyS0 panic=-1" -serial "file:$out" >/dev/null 2>&1 &
        pid=$!
        for ((i = 0; i < 40; i++)); do
            grep -q "Linux version" "$out" 2>/dev/null && { accel=kvm; break; }
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        rm -f "$out"
    fi
    rm -f "$VM_LAB_CACHE"/accel.*
    echo "$accel" >"$cache"
    echo "$accel"
}

# ------------------------------------------------------------------- VMs ----
LAB_RUN=
LAB_NS=
LAB_IMAGE=
VMS=()
declare -A VM_IP VM_NUM VM_PID VM_DISKS VM_IMG
VM_MEM=${VM_LAB_MEM:-512}

lab_init() { # TEST
    LAB_TEST=$1
    lab_require
    LAB_IMAGE=$("$LAB_REPO/scripts/vm-lab" image) || fail "no image"
    LAB_ACCEL=$(lab_accel "$LAB_IMAGE")
    log "accelerator: $LAB_ACCEL$([[ $LAB_ACCEL == tcg ]] && echo ' (KVM guests do not boot here, or no /dev/kvm)')"
    mkdir -p "$VM_LAB_CACHE/run"
    LAB_RUN=$(mktemp -d "$VM_LAB_CACHE/run/$LAB_TEST.XXXXXX")
    mkdir -p "$LAB_RUN/share"
    cp -a "$LAB_D/guest.sh" "$LAB_RUN/share/"
    LAB_NS=vmlab-$$
    ip netns add "$LAB_NS"
    ip -n "$LAB_NS" link set lo up
    ip -n "$LAB_NS" link add br0 type bridge
    ip -n "$LAB_NS" link set br0 up
    trap lab_exit EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# vm_define NAME [--image base|btrfs] [--disk SIZE]...: a VM with the next address 10.77.0.1N.
vm_define() {
    local name=$1 n=$((${#VMS[@]} + 1))
    shift
    VMS+=("$name")
    VM_NUM[$name]=$n
    VM_IP[$name]=10.77.0.1$n
    VM_IMG[$name]=base
    VM_DISKS[$name]=
    while (($#)); do
        case $1 in
            --image) VM_IMG[$name]=$2; shift 2 ;;
            --disk) VM_DISKS[$name]+=" $2"; shift 2 ;;
            *) fail "vm_define: unknown option $1" ;;
        esac
    done
}

vm_start() { # NAME
    local name=$1 n=${VM_NUM[$1]} dir=$LAB_RUN/$1 root args=() size d=0 accel
    mkdir -p "$dir"
    qemu-img create -q -f qcow2 -b "$LAB_IMAGE/${VM_IMG[$name]}.qcow2" -F qcow2 "$dir/root.qcow2"
    root="root=/dev/vda"
    [[ ${VM_IMG[$name]} == btrfs ]] && root="root=LABEL=lab-btrfs rootflags=subvol=@"
    args+=(-drive "file=$dir/root.qcow2,if=virtio,format=qcow2,cache=unsafe")
    for size in ${VM_DISKS[$name]}; do
        d=$((d + 1))
        qemu-img create -q -f qcow2 "$dir/disk$d.qcow2" "$size"
        # Writes reach the disk image (cache=writeback, not unsafe): a test's snapshot is a cut
        # of what the guest's kernel flushed.
        args+=(-drive "file=$dir/disk$d.qcow2,if=virtio,format=qcow2,cache=writeback")
    done
    ip -n "$LAB_NS" tuntap add "tap$n" mode tap
    ip -n "$LAB_NS" link set "tap$n" master br0 up
    accel=$LAB_ACCEL
    # no_timer_check below: under TCG on a loaded host the kernel's IO-APIC timer check failed
    # ("IO-APIC + timer doesn't work!") and panicked at boot.
    [[ $accel == tcg ]] && accel=tcg,thread=single
    ip netns exec "$LAB_NS" qemu-system-x86_64 -name "$name" -accel "$accel" -m "$VM_MEM" -smp 1 \
        -nodefaults -display none -no-user-config -no-reboot \
        -kernel "$LAB_IMAGE/vmlinuz" -initrd "$LAB_IMAGE/initrd.img" \
        -append "$root rw console=ttyS0 net.ifnames=0 panic=-1 no_timer_check systemd.hostname=$name lab.ip=${VM_IP[$name]}/24 systemd.show_status=0" \
        "${args[@]}" \
        -netdev "tap,id=n0,ifname=tap$n,script=no,downscript=no" \
        -device "virtio-net-pci,netdev=n0,mac=52:54:00:77:00:1$n" \
        -device virtio-serial-pci \
        -chardev "socket,id=qga,path=$dir/qga.sock,server=on,wait=off" \
        -device "virtserialport,chardev=qga,name=org.qemu.guest_agent.0" \
        -virtfs "local,path=$LAB_RUN/share,mount_tag=lab,security_model=none,readonly=on" \
        -device virtio-rng-pci \
        -serial "file:$dir/console.log" >"$dir/qemu.log" 2>&1 &
    VM_PID[$name]=$!
}

# lab_boot: starts every defined VM at once and waits until each one's systemd is up.
lab_boot() {
    local name t
    for name in "${VMS[@]}"; do vm_start "$name"; done
    for name in "${VMS[@]}"; do
        t=$(now_ms)
        # Pinged in 10 s slices, so a guest that died (a kernel panic: qemu exits) fails at once.
        local waited=0
        until "$QGA" "$LAB_RUN/$name/qga.sock" ping 10 2>/dev/null; do
            if ! kill -0 "${VM_PID[$name]}" 2>/dev/null; then
                cat "$LAB_RUN/$name/qemu.log" >&2
                tail -n 15 "$LAB_RUN/$name/console.log" >&2
                fail "$name: qemu exited while booting (console above)"
            fi
            waited=$((waited + 10))
            ((waited < ${VM_LAB_BOOT_TIMEOUT:-1200})) || fail "$name did not boot within ${VM_LAB_BOOT_TIMEOUT:-1200} s"
        done
        # multi-user reached (degraded is fine: a masked unit counts as failed for some checks).
        "$QGA" "$LAB_RUN/$name/qga.sock" exec 600 \
            'systemctl is-system-running --wait >/dev/null || true; mountpoint -q /lab || mount /lab
             # On a loaded host udev can announce eth0 after lab-net gave up waiting for it.
             udevadm settle -t 120; ip -4 -o addr show dev eth0 | grep -q inet || /usr/local/sbin/lab-net' ||
            fail "$name: no /lab share"
        log "$name up (${VM_IP[$name]}, after $(($(now_ms) - t)) ms more): $(on "$name" 'uname -r; systemctl --version | head -n1' | tr '\n' ' ')"
    done
}

# on VM SCRIPT [TIMEOUT]: runs SCRIPT (bash, as root) in VM; its stdout on ours. Fails the test
# on a non-zero exit, showing the script's stderr.
on() {
    local err rc=0
    err=$(mktemp)
    "$QGA" "$LAB_RUN/$1/qga.sock" exec "${3:-600}" "set -e; . /lab/guest.sh; $2" 2>"$err" || rc=$?
    if ((rc != 0)); then
        echo "---- $1: exit $rc from: $2" >&2
        tail -n 40 "$err" >&2
        rm -f "$err"
        fail "a command in $1 failed"
    fi
    cat "$err" >&2
    rm -f "$err"
}
# try VM SCRIPT [TIMEOUT]: like on (errexit on), but returns the exit status (stderr on ours).
try() { "$QGA" "$LAB_RUN/$1/qga.sock" exec "${3:-600}" "set -e; . /lab/guest.sh; $2"; }
# put VM FILE MODE [OWNER]: our stdin into FILE in VM.
put() { "$QGA" "$LAB_RUN/$1/qga.sock" exec 300 "install -D -m $3 ${4:+-o ${4%%:*} -g ${4##*:}} /dev/stdin '$2'" - ||
    fail "cannot write $2 in $1"; }
# bg VM SCRIPT: starts SCRIPT in VM without waiting; prints the guest pid for bg_wait.
bg() { "$QGA" "$LAB_RUN/$1/qga.sock" start ". /lab/guest.sh; $2"; }
bg_wait() { "$QGA" "$LAB_RUN/$1/qga.sock" wait "$2" "${3:-600}"; }

# spawn CMD...: runs CMD in the background; join WHAT: waits for every spawned CMD, failing the
# test (naming WHAT) if one failed.
JOBS=()
spawn() { "$@" & JOBS+=($!); }
join() {
    local p rc=0
    for p in "${JOBS[@]}"; do wait "$p" || rc=1; done
    JOBS=()
    ((rc == 0)) || fail "$1"
}

# share FILE...: copies files into the read-only share every VM sees at /lab.
share() { cp -a "$@" "$LAB_RUN/share/"; }

# ---------------------------------------------------------------- cleanup ----
lab_artifacts() {
    local dest name fetches=()
    dest=${VM_LAB_ARTIFACTS:-$VM_LAB_CACHE/artifacts}/$LAB_TEST-$(date -u +%Y%m%dT%H%M%SZ)
    mkdir -p "$dest"
    for name in "${VMS[@]}"; do
        [[ -d $LAB_RUN/$name ]] || continue
        cp "$LAB_RUN/$name/console.log" "$dest/$name.console.log" 2>/dev/null
        cp "$LAB_RUN/$name/qemu.log" "$dest/$name.qemu.log" 2>/dev/null
        # Every VM's journal at once (a loaded host took over 30 s for one under TCG).
        "$QGA" "$LAB_RUN/$name/qga.sock" exec 120 'journalctl -b --no-pager -o short-monotonic' \
            >"$dest/$name.journal.txt" 2>/dev/null &
        fetches+=($!)
    done
    # Only these (a bare `wait` would wait for the VMs' qemu too).
    ((${#fetches[@]} == 0)) || wait "${fetches[@]}"
    echo "vm-lab: consoles and journals kept in $dest" >&2
}

lab_exit() {
    local rc=$? name pid i
    set +e
    steps_summary
    if ((rc != 0)); then
        echo "vm-lab: $LAB_TEST FAILED after $PASSED checks (step: ${STEPS[-1]:-$STEP})" >&2
        [[ -n $LAB_RUN ]] && lab_artifacts
    else
        echo "vm-lab: $LAB_TEST: $PASSED checks passed" >&2
    fi
    for name in "${VMS[@]}"; do
        pid=${VM_PID[$name]:-}
        [[ -n $pid ]] && kill -TERM "$pid" 2>/dev/null
    done
    for name in "${VMS[@]}"; do
        pid=${VM_PID[$name]:-}
        [[ -n $pid ]] || continue
        for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    [[ -n $LAB_NS ]] && ip netns del "$LAB_NS" 2>/dev/null
    [[ -n $LAB_RUN && ${VM_LAB_KEEP:-} != 1 ]] && rm -rf "$LAB_RUN"
    exit "$rc"
}

# ------------------------------------------------------------------- main ----
lab_main() {
    case $1 in
        accel)
            lab_require
            lab_accel "$("$LAB_REPO/scripts/vm-lab" image)"
            ;;
        list) printf '%s\n' "${LAB_TESTS[@]}" ;;
        test)
            shift
            (($#)) || set -- "${LAB_TESTS[@]}"
            local t rc=0
            for t in "$@"; do
                [[ -f $LAB_D/test-$t ]] || lab_die "no test $t (scripts/vm-lab list)"
            done
            LAB_TEST="test"
            lab_require
            # One set of packages for every test of this run.
            if [[ -z ${VM_LAB_PACKAGES:-} && $(id -u) == 0 ]]; then
                export VM_LAB_PACKAGES=$VM_LAB_CACHE/packages
                [[ -x $LAB_TARGET/debug/quiesce-agent ]] || (cd "$LAB_REPO" && cargo build --workspace --all-targets --locked >&2)
                log "scripts/package --prebuilt $LAB_TARGET/debug --out $VM_LAB_PACKAGES"
                "$LAB_REPO/scripts/package" --prebuilt "$LAB_TARGET/debug" --out "$VM_LAB_PACKAGES" >/dev/null ||
                    fail "scripts/package failed"
            fi
            # One accelerator probe for every test of this run.
            VM_LAB_ACCEL=$(lab_accel "$("$LAB_REPO/scripts/vm-lab" image)") || fail "no image"
            export VM_LAB_ACCEL
            # VM_LAB_JOBS lanes run at once (test i in lane i mod N; each test boots its own VMs
            # in its own network namespace), their lines prefixed with the test's name.
            local jobs=${VM_LAB_JOBS:-1} lane pids=() results
            ((jobs >= 1)) || jobs=1
            results=$(mktemp)
            for ((lane = 0; lane < jobs; lane++)); do
                (
                    # A failing test must not end its lane (errexit) before the summary line.
                    set +e
                    i=0
                    for t in "$@"; do
                        if ((i % jobs == lane)); then
                            t0=$(date +%s)
                            if ((jobs > 1)); then
                                "$LAB_REPO/scripts/vm-lab" run-one "$t" 2>&1 | sed -u "s/^/[$t] /" >&2
                                r=${PIPESTATUS[0]}
                            else
                                "$LAB_REPO/scripts/vm-lab" run-one "$t"
                                r=$?
                            fi
                            printf '%6ss  %-12s %s\n' "$(($(date +%s) - t0))" "$t" \
                                "$([[ $r == 0 ]] && echo passed || echo "FAILED (exit $r)")" >>"$results"
                        fi
                        i=$((i + 1))
                    done
                ) &
                pids+=($!)
            done
            for lane in "${pids[@]}"; do wait "$lane" || rc=1; done
            echo "---- vm-lab tests ($VM_LAB_ACCEL, $jobs at a time):" >&2
            cat "$results" >&2
            grep -q FAILED "$results" && rc=1
            rm -f "$results"
            return $rc
            ;;
        run-one)
            lab_init "$2"
            # shellcheck source=/dev/null
            . "$LAB_D/test-$2"
            ;;
        *) lab_die "unknown command $1 (see --help)" ;;
    esac
}
