# trellis %post: the state directory, the proxy.d directory, and systemd rereads the units.
# The units stay disabled (no preset): edit /etc/trellis/*.toml, then
# `systemctl enable --now trellis-control` or `trellis-proxy`.
if [ ! -d /var/lib/trellis ]; then
    install -d -o trellis -g trellis -m 0750 /var/lib/trellis
fi
if [ ! -d /etc/trellis/proxy.d ]; then
    install -d -m 0755 /etc/trellis/proxy.d
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
