# Prometheus from Debian's archive on the local base (make compose-test: no registry to pull prom/prometheus).
ARG BASE_IMAGE=warmtune-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends prometheus && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["/usr/bin/prometheus"]
