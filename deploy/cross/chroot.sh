# shellcheck shell=bash
# Helpers to run commands in the cross chroot (sourced after lib/common.sh).
CROSS_ROOTFS=$BASALT_CROSS_ROOT/rootfs
CROSS_CARGO_HOME=$BASALT_CROSS_ROOT/cargo-home
CROSS_BASE_ENV=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8)

# DNS and TLS trust follow the host (crates.io may sit behind a TLS-intercepting proxy).
cross_sync_host_files() {
    cp -L --remove-destination /etc/resolv.conf "$CROSS_ROOTFS/etc/resolv.conf" 2>/dev/null || true
    if [[ -r /etc/ssl/certs/ca-certificates.crt ]]; then
        mkdir -p "$CROSS_ROOTFS/etc/ssl/certs"
        cmp -s /etc/ssl/certs/ca-certificates.crt "$CROSS_ROOTFS/etc/ssl/certs/basalt-host-bundle.crt" ||
            cp -L /etc/ssl/certs/ca-certificates.crt "$CROSS_ROOTFS/etc/ssl/certs/basalt-host-bundle.crt"
    fi
}

# cross_run N [SRC DST]*N -- ENV... -- CMD ARGS...
# Runs CMD in the chroot inside a private mount namespace: the bind mounts and
# /proc vanish with it, even when it is killed. The environment is ENV only.
cross_run() {
    unshare --mount --propagation private -- bash -c '
        set -e
        R=$1; shift; n=$1; shift
        while (( n-- > 0 )); do
            src=$1 dst=$2; shift 2
            mkdir -p "$R$dst"; mount --bind "$src" "$R$dst"
        done
        [[ $1 == -- ]] && shift
        envs=()
        while [[ $1 != -- ]]; do envs+=("$1"); shift; done
        shift
        mount -t proc proc "$R/proc"
        exec chroot "$R" /usr/bin/env -i "${envs[@]}" "$@"
    ' cross "$CROSS_ROOTFS" "$@"
}
