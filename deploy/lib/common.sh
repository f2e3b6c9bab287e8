# shellcheck shell=bash
# Shared settings for deploy/ scripts (sourced). Every BASALT_* variable is a
# default that the environment may override.

# Persistent, per-machine cache outside any clone: toolchains, target dirs,
# downloaded arm64 packages. Built once, reused by every clone and by CI.
: "${BASALT_CACHE:=/var/cache/basalt}"
# Host build output (x86_64), shared by `cargo` in a shell and by .ci/run.
: "${CARGO_TARGET_DIR:=$BASALT_CACHE/target}"
export CARGO_TARGET_DIR
# arm64 cross toolchain (a Debian trixie chroot) and its own target dir.
: "${BASALT_CROSS_ROOT:=$BASALT_CACHE/cross}"
: "${BASALT_CROSS_TARGET_DIR:=$BASALT_CACHE/target-aarch64}"
# Emulated arm64 host: kernel, busybox, modules, initramfs, root disk.
: "${BASALT_ARM64_DIR:=$BASALT_CACHE/arm64-host}"

basalt_log() { echo "basalt[$(basename "$0")]: $*" >&2; }
basalt_die() { echo "basalt[$(basename "$0")]: error: $*" >&2; exit 1; }
basalt_need_root() { [[ $(id -u) -eq 0 ]] || basalt_die "must run as root"; }

# Remove a tree we created, refusing to cross into anything mounted below it.
basalt_safe_rm() {
    local d=$1
    [[ -e $d ]] || return 0
    d=$(readlink -f "$d")
    case $d in /|/usr|/var|/var/cache|/etc|/root|/home|/tmp) basalt_die "refusing to remove $d";; esac
    if awk -v d="$d" '$5 == d || index($5, d "/") == 1 { f=1 } END { exit !f }' /proc/self/mountinfo; then
        basalt_die "something is mounted below $d"
    fi
    rm -rf --one-file-system -- "$d"
}
