#!/bin/sh
# The seed's own commands, on a manager: lb-00 and lb-01 receive the application traffic.
set -eu
docker node update --label-add nodetype=loadbalancer lb-00
docker node update --label-add nodetype=loadbalancer lb-01
