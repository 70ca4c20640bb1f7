# quiesce-agent %preun: on removal ($1 = 0) stop (the agent thaws everything) and disable.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable --now quiesce-agent.service >/dev/null 2>&1 || :
fi
