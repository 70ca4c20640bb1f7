# quiesce-coordinator %postun: reload systemd; on upgrade ($1 >= 1) restart a running
# coordinator. The catalog in /var/lib/quiesce is kept on erase (rpm has no purge): remove it
# by hand if it is no longer wanted.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then systemctl try-restart quiesce-coordinator.service >/dev/null 2>&1 || :; fi
fi
