#!/bin/sh
# On the Vagrant host, after manager-0 is up: its Swarm's join tokens into .cluster/, which the
# next machines get with the shared folder (swarm-join.sh @/vagrant/.cluster/ROLE.token).
set -eu
mkdir -p .cluster
for role in manager worker; do
    vagrant ssh manager-0 -c "sudo docker swarm join-token -q $role" | tr -d '\r' >".cluster/$role.token"
done
