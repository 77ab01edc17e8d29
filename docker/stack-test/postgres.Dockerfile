# Stand-in for the upstream postgres image (Debian bookworm's PostgreSQL 15), built by docker/test-stack.sh
# FROM a debootstrapped Debian bookworm imported as BASE. postgres-entrypoint.sh gives it the parts of the
# official image's interface that docker/compose.yaml uses: POSTGRES_USER / POSTGRES_PASSWORD /
# POSTGRES_DB, /docker-entrypoint-initdb.d/*.sql on an empty data volume, data in /var/lib/postgresql/data.
ARG BASE=vlgrpo-test/debian:bookworm
FROM ${BASE}
RUN set -eux; \
    mkdir -p /etc/postgresql-common; \
    echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.conf; \
    apt-get update; \
    apt-get install -y --no-install-recommends postgresql-15; \
    rm -rf /var/lib/apt/lists/*; \
    mkdir -p /docker-entrypoint-initdb.d /var/lib/postgresql/data /run/postgresql; \
    chown -R postgres:postgres /var/lib/postgresql /run/postgresql
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
STOPSIGNAL SIGINT
EXPOSE 5432
