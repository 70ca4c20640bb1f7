# quiesce-coordinator %post: the `quiesce` user (sysusers.d), the state directory for hosts
# without systemd, systemd reload. Not enabled on install: it needs certificates first.
systemd-sysusers quiesce-coordinator.conf >/dev/null 2>&1 || :
install -d -o quiesce -g quiesce -m 0750 /var/lib/quiesce
install -d -m 0755 /etc/quiesce/tls
if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null 2>&1 || :; fi
