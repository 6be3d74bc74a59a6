# Redis from Debian's archive on the local base (make compose-test: no registry to pull redis:7-alpine).
ARG BASE_IMAGE=warmtune-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends redis-server redis-tools && rm -rf /var/lib/apt/lists/*
WORKDIR /data
CMD ["redis-server"]
