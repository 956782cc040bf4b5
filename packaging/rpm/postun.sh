# trellis %postun. On upgrade ($1 >= 1) restart what runs (a control node hands leadership
# over first). On erase ($1 = 0) /var/lib/trellis (raft log, CA, keys) is kept, as Fedora's
# packaging guidelines ask of user data: `rm -rf /var/lib/trellis` after `rpm -e` discards it;
# the trellis user and group stay too. An empty /etc/trellis/proxy.d goes.
if [ "$1" -eq 0 ]; then
    rmdir /etc/trellis/proxy.d 2>/dev/null || :
    rmdir /etc/trellis 2>/dev/null || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart trellis-control.service trellis-proxy.service \
            'trellis-proxy@*.service' >/dev/null 2>&1 || :
    fi
fi
exit 0
