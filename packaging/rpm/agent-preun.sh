# quiesce-agent %preun: on removal ($1 = 0) stop (the agent thaws everything) and disable.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable --now quiesce-agent.service >/dev/null 2>&1 || :
fi
# Without systemd as PID 1 nothing would stop it: the running /usr/bin/quiesce-agent processes
# get SIGTERM and are waited for, at most 60 s (one still running then is named, left running).
if [ "$1" -eq 0 ] && [ ! -d /run/systemd/system ]; then
    exe=/usr/bin/quiesce-agent
    pids=
    for p in /proc/[0-9]*; do
        if [ "$(readlink "$p/exe" 2>/dev/null)" = "$exe" ]; then
            pids="$pids ${p#/proc/}"
        fi
    done
    if [ -n "$pids" ]; then
        echo "quiesce-agent: no systemd here: stopping $exe (pid$pids) with SIGTERM" >&2
        kill -TERM $pids 2>/dev/null || true
        i=0
        alive=$pids
        while [ -n "$alive" ] && [ $i -lt 600 ]; do
            sleep 0.1
            i=$((i + 1))
            left=
            for pid in $alive; do
                # Exited, or a zombie its parent has not reaped yet.
                state=$(sed -n 's/^State:[[:space:]]*\(.\).*/\1/p' "/proc/$pid/status" 2>/dev/null) || state=
                if [ -n "$state" ] && [ "$state" != Z ]; then
                    left="$left $pid"
                fi
            done
            alive=$left
        done
        if [ -n "$alive" ]; then
            echo "quiesce-agent: $exe (pid$alive) still runs 60 s after SIGTERM; left running" >&2
        fi
    fi
fi
