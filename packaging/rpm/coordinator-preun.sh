# quiesce-coordinator %preun: on removal ($1 = 0) stop and disable.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable --now quiesce-coordinator.service >/dev/null 2>&1 || :
fi
