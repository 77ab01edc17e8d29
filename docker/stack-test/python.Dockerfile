# Stand-in for python:3.11-slim on machines that reach Debian's archive and PyPI but no image registry
# (docker/test-stack.sh builds it FROM a debootstrapped Debian bookworm imported as BASE). Debian bookworm's
# python3.11 plays the part of the upstream image's /usr/local/bin/python3.11.
ARG BASE=vlgrpo-test/debian:bookworm
FROM ${BASE}
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates; \
    rm -rf /var/lib/apt/lists/*
# This machine's trust store (it may hold a TLS-inspecting egress CA that Debian's bundle lacks), for pip:
# pip trusts its own certifi copy unless told otherwise. The file holds public CA certificates only.
COPY host-ca-bundle.crt /etc/ssl/host-ca-bundle.crt
RUN printf '[global]\ncert = /etc/ssl/host-ca-bundle.crt\ntimeout = 180\n' > /etc/pip.conf
CMD ["python3.11"]
