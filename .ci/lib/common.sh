# Shared by .ci/*: where provisioned platforms live and how to reach Debian's archive.
# Sourced, not run.

# Provisioned platforms (containerd 2.x binaries, the Debian 13 root) are kept here and
# reused by later runs on the same machine; a stamp file says a platform is complete.
CACHE=${PYSHIM_CI_CACHE:-/var/cache/pyshim-ci}

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# The Debian mirror this host's own apt uses: its first deb.sources URIs or
# sources.list line for the main archive (not -security).
host_mirror() {
    local m
    m=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' \
        | grep -v -- '-security' | head -n 1)
    if [ -z "$m" ]; then
        m=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
            | sed -E 's/^deb (\[[^]]*\] )?//' | awk '{print $1}' | grep -v -- '-security' | head -n 1)
    fi
    [ -n "$m" ] || { log "no Debian mirror in this host's apt sources"; return 1; }
    printf '%s\n' "${m%/}"
}

# The host's Debian major version (12, 13, ...).
host_debian() { cut -d. -f1 /etc/debian_version; }

# apt-get/apt-cache with a private state under $1: a suite of Debian's archive that
# this host does not use, never touching the host's own apt state.
private_apt() {
    local dir=$1; shift
    local tool=$1; shift
    "$tool" -o Dir::State="$dir" -o Dir::State::Lists="$dir/lists" \
        -o Dir::State::status="$dir/status" -o Dir::Cache="$dir/cache" \
        -o Dir::Etc::SourceList="$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null \
        -o Acquire::Check-Valid-Until=false -o APT::Sandbox::User=root "$@"
}

private_apt_init() {
    local dir=$1 suite=$2 mirror
    mirror=$(host_mirror)
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
    touch "$dir/status"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" \
        > "$dir/sources.list"
    private_apt "$dir" apt-get update -q >&2
}
