#!/bin/sh
# mktme-emu guest init (PID 1 of the initramfs; busybox ash).
#
# Why it looks like this: the guest has no distribution of its own.  It borrows
# the host's root filesystem read-only over 9p (so ndctl, mkfs, python3 and the
# project's venv are the host's), makes /tmp and /var/tmp writable overlays of
# the host's copies (writes stay in guest memory), mounts each --rwdir
# read-write at its own path (writes land on the host), and runs one command
# (or a shell) in a chroot of it.  Everything the host must know travels on
# the virtio-serial port org.mktme.status, one line per message (the host side
# is emulator/vm/status.py):
#   host -> guest:  "boot N" | "cmd BASE64" | "interactive" | "rw TAG BASE64PATH" | "go"
#   guest -> host:  "hello UPTIME" | "start" | "exit RC" | "init-error MESSAGE"
# Kernel parameters read here: mktme.ns=fsdax|devdax|raw (prepare every NVDIMM
# namespace in that mode), mktme.tty=ROWSxCOLS, mktme.path=DIR (prepended to
# PATH), mktme.debug=1 (trace this script on the console), mktme.net=ADDR/PREFIX,GATEWAY
# (bring the first NIC up with that static address: no DHCP wait).
# A kernel panic is the host's business: pvpanic-pci is loaded first and QEMU
# reports GUEST_PANICKED over QMP.

export PATH=/bin:/sbin
NEWROOT=/newroot
STATUS_PORT=org.mktme.status
STATUS=
BOOT=0
CMD=
INTERACTIVE=0
RW_MOUNTS=
NS_MODE=
TTY_SIZE=
EXTRA_PATH=
NET=

log() { echo "mktme-init: $*" >/dev/console; }

# Report on the status port when it is open, and always on the console.
send() { [ -n "$STATUS" ] && echo "$*" >&3; }

finish() {
    sync
    poweroff -f
    sleep 5
}

fail() {
    log "error: $*"
    send "init-error $*"
    finish
}

parse_cmdline() {
    for arg in $(cat /proc/cmdline); do
        case "$arg" in
            mktme.ns=*) NS_MODE=${arg#mktme.ns=} ;;
            mktme.tty=*) TTY_SIZE=${arg#mktme.tty=} ;;
            mktme.path=*) EXTRA_PATH=${arg#mktme.path=} ;;
            mktme.keep=*) KEEP_DIRS=$(echo "${arg#mktme.keep=}" | tr , ' ') ;;
            mktme.net=*) NET=${arg#mktme.net=} ;;
            mktme.debug=1) set -x ;;
        esac
    done
}

load_modules() {
    while read -r mod; do
        [ -n "$mod" ] || continue
        insmod "/lib/modules/$mod" 2>/dev/console || fail "insmod $mod failed"
    done </lib/modules/order
    # The filesystems (ext4, xfs) load when first mounted: the kernel asks this helper.
    [ -e /proc/sys/kernel/modprobe ] && echo /lib/modules/modprobe >/proc/sys/kernel/modprobe
}

# mktme.net: lo and the first NIC (virtio_net names it as insmod returns; wait
# at most 1 s anyway) up with a static address and a default route.
setup_net() {
    [ -n "$NET" ] || return 0
    busybox ip link set lo up
    tries=0
    while :; do
        dev=
        for d in /sys/class/net/*; do [ "${d##*/}" = lo ] || { dev=${d##*/}; break; }; done
        [ -n "$dev" ] && break
        [ $tries -lt 20 ] || fail "no network interface appeared for mktme.net"
        usleep 50000
        tries=$((tries + 1))
    done
    busybox ip addr add "${NET%,*}" dev "$dev" && busybox ip link set "$dev" up \
        && busybox ip route add default via "${NET#*,}" || fail "cannot configure $dev as $NET"
}

# Without udev nobody names the ports: /dev/vportNpM gets a symlink
# /dev/virtio-ports/NAME from /sys/class/virtio-ports/vportNpM/name.
link_ports() {
    mkdir -p /dev/virtio-ports
    tries=0
    while [ ! -e /dev/virtio-ports/$STATUS_PORT ] && [ $tries -lt 100 ]; do
        for port in /sys/class/virtio-ports/vport*; do
            [ -r "$port/name" ] || continue
            name=$(cat "$port/name")
            dev=/dev/${port##*/}
            [ -n "$name" ] && [ -e "$dev" ] && ln -sf "$dev" "/dev/virtio-ports/$name"
        done
        [ -e /dev/virtio-ports/$STATUS_PORT ] || { usleep 50000; tries=$((tries + 1)); }
    done
}

open_status() {
    [ -e /dev/virtio-ports/$STATUS_PORT ] || fail "virtio-serial port $STATUS_PORT not found"
    exec 3<>/dev/virtio-ports/$STATUS_PORT || fail "cannot open $STATUS_PORT"
    STATUS=1
    read -r uptime _ </proc/uptime  # the kernel's own clock, for the host's phase timer
    send "hello $uptime"
    while read -r key value <&3; do
        case "$key" in
            boot) BOOT=$value ;;
            cmd) CMD=$value ;;
            interactive) INTERACTIVE=1 ;;
            rw) RW_MOUNTS="$RW_MOUNTS $value" ;;  # "TAG BASE64PATH" pairs
            go) return 0 ;;
        esac
    done
    fail "status channel closed before go"
}

mount_root() {
    mkdir -p $NEWROOT
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose \
        hostroot $NEWROOT || fail "cannot mount the host root over 9p"
    mkdir -p /hostview
    mount --bind $NEWROOT /hostview || fail "cannot bind the host root"
    # /tmp and /var/tmp: the host's files stay visible (a script in a host
    # temporary directory runs), writes go to a tmpfs upper layer.
    for dir in tmp var/tmp; do
        [ -d "$NEWROOT/$dir" ] || continue
        overlay_rw "$dir"
    done
    for dir in run mnt; do
        [ -d "$NEWROOT/$dir" ] || continue
        mount -t tmpfs -o mode=1777 tmpfs "$NEWROOT/$dir" || fail "cannot mount tmpfs on /$dir"
    done
    # The project (source and venv) or the working directory may live under
    # /run or /mnt: show the host's copy through the tmpfs.
    for dir in $KEEP_DIRS; do
        case "$dir" in /run|/mnt|/) continue ;; esac
        # Only what the tmpfs hid: a visible directory is left alone.
        [ -d "/hostview$dir" ] && [ ! -d "$NEWROOT$dir" ] || continue
        mkdir -p "$NEWROOT$dir" && mount --bind "/hostview$dir" "$NEWROOT$dir" \
            || fail "cannot show $dir in the guest"
    done
    mount_rwdirs
    mount --bind /proc $NEWROOT/proc || fail "cannot bind /proc"
    mount --bind /sys $NEWROOT/sys || fail "cannot bind /sys"
    mount --bind /dev $NEWROOT/dev || fail "cannot bind /dev"
    mkdir -p /dev/pts /dev/shm
    mount -t devpts devpts $NEWROOT/dev/pts
    mount -t tmpfs -o mode=1777 tmpfs $NEWROOT/dev/shm
    wrap_power_commands
}

# An overlay of the host's /$1 (read-only 9p) with a tmpfs upper layer, as
# virtme-ng's --overlay-rwdir does.
overlay_rw() {
    upper=/overlay/$(echo "$1" | tr / _)
    mkdir -p $upper
    mount -t tmpfs -o mode=755 tmpfs $upper || fail "cannot mount tmpfs for /$1"
    mkdir -p $upper/upper $upper/work
    chmod 1777 $upper/upper
    mount -t overlay -o "lowerdir=/hostview/$1,upperdir=$upper/upper,workdir=$upper/work" \
        overlay "$NEWROOT/$1" || fail "cannot mount an overlay on /$1"
}

# Each --rwdir: the host exports it read-write under a tag; mount it at the
# same path, over whatever shows that path now (an overlay, a tmpfs).
mount_rwdirs() {
    set -- $RW_MOUNTS
    while [ $# -ge 2 ]; do
        dir=$(echo "$2" | base64 -d) || fail "bad rwdir encoding"
        mkdir -p "$NEWROOT$dir" 2>/dev/null
        mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 "$1" "$NEWROOT$dir" \
            || fail "cannot mount --rwdir $dir"
        shift 2
    done
}

# The host's reboot/poweroff refuse to act in a chroot (systemctl); put
# scripts that sync and ask the kernel directly (sysrq b = reset, o = off)
# in /run/mktme/bin, first in PATH.
wrap_power_commands() {
    mkdir -p $NEWROOT/run/mktme/bin
    for cmd in reboot:b poweroff:o halt:o; do
        printf '#!/bin/sh\nsync\necho %s >/proc/sysrq-trigger\nsleep 10\n' "${cmd#*:}" \
            >$NEWROOT/run/mktme/bin/${cmd%:*}
        chmod 755 $NEWROOT/run/mktme/bin/${cmd%:*}
    done
}

# Put every NVDIMM namespace into $NS_MODE (skip those already in it, so a
# power cycle keeps the filesystem that is on it).
prepare_namespaces() {
    [ -n "$NS_MODE" ] || return 0
    tries=0
    while ! ls /sys/bus/nd/devices/ 2>/dev/null | grep -q '^namespace'; do
        [ $tries -lt 100 ] || fail "no NVDIMM namespace appeared for mktme.ns=$NS_MODE"
        usleep 50000
        tries=$((tries + 1))
    done
    for ns in /sys/bus/nd/devices/namespace*.0; do
        ns=${ns##*/}
        if chroot $NEWROOT ndctl list -n "$ns" | grep -q "\"mode\":\"$NS_MODE\""; then
            continue
        fi
        chroot $NEWROOT ndctl create-namespace -f -e "$ns" -m "$NS_MODE" >/dev/null 2>/dev/console \
            || fail "ndctl create-namespace -e $ns -m $NS_MODE failed"
    done
}

run_command() {
    export HOME=/tmp TERM=${TERM:-linux} MKTME_BOOT=$BOOT
    export PATH=/run/mktme/bin:${EXTRA_PATH:+$EXTRA_PATH:}/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    if [ -n "$TTY_SIZE" ]; then
        stty rows "${TTY_SIZE%x*}" cols "${TTY_SIZE#*x}" </dev/console 2>/dev/null
    fi
    if [ -n "$CMD" ]; then
        echo "$CMD" | base64 -d >$NEWROOT/tmp/.mktme-cmd || fail "bad command encoding"
        set -- /bin/sh /tmp/.mktme-cmd
    else
        set -- /bin/sh -c 'if [ -x /bin/bash ]; then exec /bin/bash -i; fi; exec /bin/sh -i'
    fi
    send start
    if [ "$INTERACTIVE" = 1 ]; then
        setsid -c chroot $NEWROOT "$@" </dev/console >/dev/console 2>&1
    else
        chroot $NEWROOT "$@" </dev/null >/dev/console 2>&1
    fi
    rc=$?
    send "exit $rc"
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
parse_cmdline
load_modules
link_ports
open_status
setup_net
mount_root
prepare_namespaces
run_command
finish
