#!/bin/sh
# The seed's demo service, created as the seed creates it, on a manager. Extra `docker service
# create` flags come first (the namespaces' engines build the image locally and pass
# `--detach --no-resolve-image`; a VM pulls it).
set -eu
docker service create "$@" \
    --name demo \
    --label com.docker.lb.hosts=demo.local \
    --label com.docker.lb.port=8080 \
    --publish mode=host,target=8080 \
    --env METADATA=demo \
    ehazlett/docker-demo
