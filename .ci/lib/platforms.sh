# The platforms of the test matrix: how each is provisioned and entered. Sourced by
# .ci/matrix after lib/common.sh. Each provision_* is idempotent and prints nothing on
# stdout but the path it provides.

CONTAINERD2_VERSION=2.1.9   # Debian unstable's containerd package

# containerd 2.x: Debian unstable's containerd package, unpacked (not installed): its
# binaries run on Debian 12 and 13. Its runc is not taken (it needs a newer glibc): the
# host's runc serves both shims. Prints the directory holding containerd, ctr and the
# Go shim containerd-shim-runc-v2.
provision_containerd2() {
    local dir=$CACHE/containerd-$CONTAINERD2_VERSION
    if [ ! -e "$dir/.complete" ]; then
        log "containerd2: fetching Debian unstable's containerd $CONTAINERD2_VERSION"
        rm -rf "$dir"
        mkdir -p "$dir"
        private_apt_init "$dir/apt" unstable
        (cd "$dir/apt" && private_apt "$dir/apt" apt-get download -q \
            "containerd=$CONTAINERD2_VERSION*" >&2)
        dpkg-deb -x "$dir"/apt/containerd_*.deb "$dir/root"
        rm -rf "$dir/apt"
        "$dir/root/usr/bin/containerd" --version >&2
        touch "$dir/.complete"
    fi
    printf '%s\n' "$dir/root/usr/bin"
}

DEBIAN13_PACKAGES=containerd,runc,busybox-static,criu,python3,python3-venv,python3-dev,gcc,libc6-dev,libffi-dev,git,ca-certificates,procps,iproute2
# criu only suggests iptables, but locks a dumped task's network namespace with
# iptables-restore (its default --network-lock), so a container checkpoint fails
# without it: "execvp("iptables-restore", ...) failed" in criu-dump.log.
DEBIAN13_LATER_PACKAGES="iptables"

# Debian 13 (containerd 1.7, runc 1.1.15, Python 3.13) as a root made by debootstrap
# from the host's own mirror. Prints the root's path.
provision_debian13() {
    local root=$CACHE/debian13 mirror
    local stamp="$root/.complete-$DEBIAN13_PACKAGES"
    if [ ! -e "$stamp" ]; then
        mirror=$(host_mirror)
        log "debian13: debootstrap trixie from $mirror (a few minutes)"
        rm -rf "$root"
        debootstrap --variant=minbase --include="$DEBIAN13_PACKAGES" trixie "$root" "$mirror" \
            > "$CACHE/debian13-debootstrap.log" 2>&1 \
            || { tail -n 30 "$CACHE/debian13-debootstrap.log" >&2; return 1; }
        touch "$stamp"
    fi
    # pip in the root reaches PyPI as the host does.
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    # Added to a root already made (installed, not re-bootstrapped: other trees may be
    # testing in it), each with its own stamp.
    local pkg
    for pkg in $DEBIAN13_LATER_PACKAGES; do
        [ -e "$root/.complete-later-$pkg" ] && continue
        log "debian13: installing $pkg"
        in_root "$root" apt-get install -y -q --no-install-recommends "$pkg" \
            > "$CACHE/debian13-apt-$pkg.log" 2>&1 \
            || { tail -n 30 "$CACHE/debian13-apt-$pkg.log" >&2; return 1; }
        touch "$root/.complete-later-$pkg"
    done
    printf '%s\n' "$root"
}

SID_PACKAGES=containerd,runc,busybox-static,criu,iptables,python3,python3-venv,python3-dev,gcc,libc6-dev,libffi-dev,git,ca-certificates,procps,iproute2,debootstrap

# Debian unstable (Python 3.14, containerd 2.1.9, runc 1.3) as a root made by
# debootstrap from the host's own mirror, for the immortal template heap's layout on
# 3.14. Its python3.14 needs a newer glibc than Debian 12's, so it cannot be unpacked
# beside the host's as containerd 2.x is. The archive's unstable Release may be past
# its Valid-Until: debootstrap does not check that, and apt in the root is told not
# to (Acquire::Check-Valid-Until=false, written into the root's apt.conf.d). Prints
# the root's path.
provision_sid() {
    local root=$CACHE/sid mirror
    local stamp="$root/.complete-$SID_PACKAGES"
    if [ ! -e "$stamp" ]; then
        mirror=$(host_mirror)
        log "sid: debootstrap sid from $mirror (a few minutes)"
        rm -rf "$root"
        debootstrap --variant=minbase --include="$SID_PACKAGES" sid "$root" "$mirror" \
            > "$CACHE/sid-debootstrap.log" 2>&1 \
            || { tail -n 30 "$CACHE/sid-debootstrap.log" >&2; return 1; }
        echo 'Acquire::Check-Valid-Until "false";' > "$root/etc/apt/apt.conf.d/99pyshim-no-valid-until"
        touch "$stamp"
    fi
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    printf '%s\n' "$root"
}

# Runs a command as root inside a provisioned root, in a private mount namespace: the
# root bound onto itself, /proc, /sys, /dev from the host, fresh tmpfs on /run and /tmp;
# everything is gone when the command ends. The root becomes the namespace's root by
# pivot_root, not chroot: runc's own pivot_root from inside a chroot leaves a
# container's processes on the namespace's root, i.e. the host's files, /dev and /proc
# instead of the container's rootfs (the container's /dev/pts is then the host's, and
# its /proc/1 the host's init).
in_root() {
    local root=$1; shift
    unshare -m --propagation private /bin/sh -eu -c '
        root=$1; shift
        mount --bind "$root" "$root"
        mount --rbind /proc "$root/proc"
        mount --rbind /sys "$root/sys"
        mount --rbind /dev "$root/dev"
        mount -t tmpfs -o mode=0755 tmpfs "$root/run"
        mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
        mkdir -p "$root/.host"
        cd "$root"
        pivot_root . .host
        exec /usr/sbin/chroot . /bin/sh -eu -c "umount -l /.host; exec \"\$@\"" in_root \
            /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
            PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            CI="${CI:-}" "$@"
    ' in_root "$root" "$@"
}
