# quiesce-agent %post: freeze-record directory now; reload systemd; a running agent is
# restarted by %postun on upgrade. Not enabled on install: it needs certificates first.
systemd-tmpfiles --create quiesce-agent.conf >/dev/null 2>&1 || :
install -d -m 0755 /etc/quiesce/tls
if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null 2>&1 || :; fi
