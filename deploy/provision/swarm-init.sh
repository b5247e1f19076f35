#!/bin/sh
# The first manager: `docker swarm init`. Usage: swarm-init.sh ADVERTISE_ADDR
# Run by the Vagrantfile in a VM and by `cargo xtask cluster` (and the tests) against an engine
# in a namespace: `docker` reaches the node's engine through DOCKER_HOST when it is set.
set -eu
docker swarm init --advertise-addr "$1" >/dev/null
