# shellcheck shell=bash
# Quiesce in the lab, as docs/operations.md tells an operator to set it up: the packages
# installed with apt from files, certificates enrolled from a CA on the coordinator's host, the
# configs edited, the services enabled with systemctl. Sourced by the tests after lib.sh.
#
# Topology of every test but btrfs-root: `coord` (quiesce-coordinator, quiescectl), `db1` and
# `db2` (quiesce-agent), each agent host with a virtio disk holding an XFS pool of loop volumes.

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$LAB_REPO/Cargo.toml" | head -n1)
AGENT_DEB=quiesce-agent_${VERSION}-1_amd64.deb
COORD_DEB=quiesce-coordinator_${VERSION}-1_amd64.deb
# The group's timing: a set may stay frozen while the hold hook waits (lease renewals start
# only with the snapshot phase, so the lease covers the hold: a certificate rotation with two
# reloads under TCG on a loaded 2-core host took 100 s, past a 40 s lease). The budget and the
# phase timeout cover the lease; the lab's agents get max-freeze 5m (packaged: 60s) to allow it.
LEASE=120s

# q_packages: the packages scripts/vm-lab test made of the binaries scripts/test built (as
# scripts/package-check makes them: --prebuilt), plus a newer build of the agent's (same files, Debian revision 2) for the upgrade.
q_packages() {
    local out=${VM_LAB_PACKAGES:?scripts/vm-lab test sets VM_LAB_PACKAGES}
    [[ -s $out/$AGENT_DEB && -s $out/$COORD_DEB ]] || fail "no $AGENT_DEB / $COORD_DEB in $out"
    share "$out/$AGENT_DEB" "$out/$COORD_DEB"
    local x=$LAB_RUN/upgrade
    rm -rf "$x" && mkdir -p "$x"
    dpkg-deb -R "$out/$AGENT_DEB" "$x/tree"
    sed -i "s/^Version: .*/Version: ${VERSION}-2/" "$x/tree/DEBIAN/control"
    dpkg-deb -b -Zgzip -z1 "$x/tree" "$LAB_RUN/share/quiesce-agent_${VERSION}-2_amd64.deb" >/dev/null
}

q_install() { # VM DEB...
    local vm=$1 debs
    shift
    debs=$(printf ' /lab/%s' "$@")
    on "$vm" "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $debs >/tmp/apt.log 2>&1 || { tail -n 30 /tmp/apt.log >&2; exit 1; }" 600
    # For the artifacts of a failed test: the connection layer's debug lines (refused and timed
    # out TLS handshakes) in the journal. A drop-in, as an operator would add one.
    on "$vm" 'for u in quiesce-agent quiesce-coordinator; do
            mkdir -p /etc/systemd/system/$u.service.d
            printf "[Service]\nEnvironment=QUIESCE_LOG=info,quiesce_proto=debug\n" >/etc/systemd/system/$u.service.d/lab-log.conf
        done
        systemctl daemon-reload'
}

# q_pki AGENT...: a CA on coord, its certificates, and each agent host's pair distributed
# through the lab's control channel (as an operator would copy them).
q_pki() {
    local a
    on coord "quiescectl pki init --dir /root/pki >/dev/null
        quiescectl pki issue --dir /root/pki --role coordinator --name coordinator --ip ${VM_IP[coord]} --ip 127.0.0.1 >/dev/null
        quiescectl pki issue --dir /root/pki --role operator --name lab >/dev/null
        install -m 0644 /root/pki/ca.pem /etc/quiesce/tls/ca.pem
        install -m 0644 /root/pki/coordinator.pem /etc/quiesce/tls/coordinator.pem
        install -m 0640 -g quiesce /root/pki/coordinator.key /etc/quiesce/tls/coordinator.key"
    for a in "$@"; do
        on coord "quiescectl pki issue --dir /root/pki --role agent --name $a --ip ${VM_IP[$a]} >/dev/null"
        q_enrol "$a"
    done
}
q_enrol() { # AGENT: its pair from coord's CA dir into /etc/quiesce/tls, replaced atomically
    local a=$1
    on coord 'cat /root/pki/ca.pem' | put "$a" /etc/quiesce/tls/ca.pem 0644
    on coord "cat /root/pki/$a.pem" | put "$a" /etc/quiesce/tls/agent.pem.new 0644
    on coord "cat /root/pki/$a.key" | put "$a" /etc/quiesce/tls/agent.key.new 0600
    on "$a" 'mv /etc/quiesce/tls/agent.key.new /etc/quiesce/tls/agent.key
        mv /etc/quiesce/tls/agent.pem.new /etc/quiesce/tls/agent.pem'
}

# q_volumes VM: the pool on /dev/vdb and two volumes, /srv/data and /srv/wal.
q_volumes() {
    on "$1" 'pool /dev/vdb /pool; volume /pool data 192M /srv/data; volume /pool wal 96M /srv/wal'
}

# q_agent_config VM [HOOKS]: the installed agent.toml, edited: the two volumes, and HOOKS
# (TOML appended; the file is then 0600, as check-config requires of a config with hooks).
q_agent_config() {
    on "$1" "sed -i 's/^max-freeze = .*/max-freeze = \"5m\"/' /etc/quiesce/agent.toml
grep -qx 'max-freeze = \"5m\"' /etc/quiesce/agent.toml
cat >>/etc/quiesce/agent.toml <<'EOF'

[[volume]]
mount = \"/srv/data\"

[[volume]]
mount = \"/srv/wal\"
${2:-}
EOF
chmod 0600 /etc/quiesce/agent.toml"
}
HOLD_HOOK='
[hook.hold]
type = "exec"
dir = "/etc/quiesce/hooks.d"
quiesce-timeout = "150s"'
PG_HOOK='
[hook.pg]
type = "postgres"
host = "/run/postgresql"
user = "postgres"'

# q_coord_config DB1HOOKS DB2HOOKS: group `bank` of db1's and db2's volumes.
q_coord_config() {
    on coord "cat >>/etc/quiesce/coordinator.toml <<'EOF'

[[agent]]
name = \"db1\"
endpoint = \"https://${VM_IP[db1]}:7401\"

[[agent]]
name = \"db2\"
endpoint = \"https://${VM_IP[db2]}:7401\"

[[group]]
name = \"bank\"
provider = \"reflink\"
lease = \"$LEASE\"
freeze-budget = \"150s\"
phase-timeout = \"200s\"

[[group.member]]
agent = \"db1\"
mounts = [\"/srv/data\", \"/srv/wal\"]
hooks = [$1]

[[group.member]]
agent = \"db2\"
mounts = [\"/srv/data\", \"/srv/wal\"]
hooks = [$2]
EOF"
}

# quiescectl on coord, as the operator `lab`.
QCTL='QUIESCECTL_CA=/root/pki/ca.pem QUIESCECTL_CERT=/root/pki/lab.pem QUIESCECTL_KEY=/root/pki/lab.key quiescectl'

# q_enable VM UNIT PORT: systemctl enable --now, with the evidence that systemd waited for
# READY=1: the unit is Type=notify and active, and its port was already listening when
# `systemctl start` returned (the daemons bind before they notify; with Type=simple start
# returns right after the fork).
q_enable() {
    local vm=$1 unit=$2 port=$3 ms
    ms=$(on "$vm" "t0=\$(date +%s%3N); systemctl enable --now $unit 2>/dev/null; t1=\$(date +%s%3N)
        ss -Hltn 'sport = :$port' | grep -q LISTEN || { echo 'nothing listens on $port when systemctl start returned' >&2; exit 1; }
        [ \"\$(systemctl show -p Type --value $unit)\" = notify ] || { echo 'not Type=notify' >&2; exit 1; }
        systemctl is-active -q $unit
        systemctl is-enabled -q $unit
        echo \$((t1 - t0))")
    pass "$vm: systemctl enable --now $unit returned after READY=1 ($ms ms), :$port listening by then"
}

# q_backup_bg: starts `quiescectl backup bank --json` on coord; prints the guest pid.
q_backup_bg() { bg coord "$QCTL backup bank --json >/tmp/backup.json 2>/tmp/backup.err; echo \$? >/tmp/backup.rc"; }
# q_set_state: state and id of the last backup, and its exit status ("STATE ID RC").
q_set_state() {
    on coord 'echo "$(cat /tmp/backup.rc)"; cat /tmp/backup.json' | python3 -c '
import json, sys
rc = sys.stdin.readline().strip()
try:
    s = json.load(sys.stdin)
except ValueError:
    s = {}
print(s.get("state") or "none", s.get("id") or "none", rc or "none")'
}
q_backup() { # a consistent set, its id printed
    local pid st
    pid=$(q_backup_bg)
    bg_wait coord "$pid" 300 >/dev/null || fail "backup did not end"
    read -r -a st <<<"$(q_set_state)"
    [[ ${st[0]} == consistent && ${st[2]} == 0 ]] ||
        { on coord 'cat /tmp/backup.err /tmp/backup.json' >&2; fail "backup: set ${st[1]} is ${st[0]} (exit ${st[2]})"; }
    echo "${st[1]}"
}
# q_hold VM: the next set waits in VM's hold hook; q_wait_frozen VM: until VM's agent holds a
# freeze; q_release VM.
q_hold() { on "$1" 'touch /run/lab-hold'; }
q_release() { on "$1" 'rm -f /run/lab-hold'; }
q_wait_frozen() { on "$1" 'wait_for 180 held' 200; }
