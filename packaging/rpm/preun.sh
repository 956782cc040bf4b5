# trellis %preun: on erase ($1 = 0) stop and disable the services; an upgrade ($1 >= 1)
# restarts them in %postun instead.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable --now trellis-control.service trellis-proxy.service \
        'trellis-proxy@.service' >/dev/null 2>&1 || :
    systemctl stop 'trellis-proxy@*.service' >/dev/null 2>&1 || :
fi
exit 0
