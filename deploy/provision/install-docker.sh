#!/bin/sh
# A VM of the Vagrantfile: Debian's Docker engine, as the project's own machines run it.
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q docker.io curl
systemctl enable --now docker
