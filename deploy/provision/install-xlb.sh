#!/bin/sh
# A VM of the Vagrantfile: xlb from the shared folder, its config and token, and the unit of the
# node's role. Usage: install-xlb.sh controller
#                     install-xlb.sh proxy INTERFACE MANAGER_ADDR...
# The controllers' bearer token is the shared folder's .cluster/xlb.token (the Vagrantfile makes
# it before the first machine comes up).
set -eu
role=$1
shift
share=/vagrant
install -m 0755 "$share/target/release/xlb" /usr/bin/xlb
install -d -m 0755 /etc/xlb
install -m 0644 "$share/deploy/cluster/config.toml" /etc/xlb/config.toml
install -m 0600 "$share/.cluster/xlb.token" /etc/xlb/token
case "$role" in
controller) ;;
proxy)
    interface=$1
    shift
    args="--interface $interface"
    for manager in "$@"; do
        args="$args --controller http://$manager:2376"
    done
    printf 'XLB_PROXY_ARGS=%s\n' "$args" >/etc/xlb/proxy.env
    ;;
*)
    echo "install-xlb.sh: unknown role $role" >&2
    exit 2
    ;;
esac
install -m 0644 "$share/deploy/systemd/xlb-$role.service" /etc/systemd/system/
systemctl daemon-reload
systemctl enable --now "xlb-$role.service"
