#!/bin/sh
# Joins this node's engine to the Swarm. Usage: swarm-join.sh TOKEN ADVERTISE_ADDR MANAGER_ADDR
# (TOKEN: the role's join token; `@FILE` reads it from FILE, as the Vagrantfile passes the
# ones the Vagrantfile fetched from the first manager).
set -eu
token=$1
advertise_addr=$2
manager_addr=$3
case "$token" in
@*) token=$(cat "${token#@}") ;;
esac
docker swarm join --token "$token" --advertise-addr "$advertise_addr" "$manager_addr:2377" >/dev/null
