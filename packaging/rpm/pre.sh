# trellis %pre: the trellis system user and group (before the files, so rpm can give
# /var/lib/trellis and the configs their owner).
getent group trellis >/dev/null || groupadd --system trellis
getent passwd trellis >/dev/null || \
    useradd --system --gid trellis --home-dir /var/lib/trellis --no-create-home \
        --shell /sbin/nologin --comment "trellis service mesh" trellis
exit 0
