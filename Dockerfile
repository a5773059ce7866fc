# syntax=docker/dockerfile:1
#
# The jobwire server. Point it at PostgreSQL with DATABASE_URL (or --database-url); without one it
# runs its embedded default, a private PostgreSQL cluster in $JOBWIRE_DATA_DIR, from the
# postgresql package installed below.
#
#   docker build -t jobwire .
#   KEY=$(docker run --rm -e DATABASE_URL=postgres://user:pass@db/jobwire jobwire \
#         keys create --tenant acme --role admin)
#   docker run -p 50051:50051 -e DATABASE_URL=postgres://user:pass@db/jobwire jobwire
#
# It listens on every address of the container, so it refuses to start until the first API key
# exists (or with --insecure-no-auth). With the embedded default, make the key in the same
# volume: `docker run --rm -v jobwire-data:/var/lib/jobwire jobwire keys create ...`, then
# `docker run -p 50051:50051 -v jobwire-data:/var/lib/jobwire jobwire`. compose.yaml runs it
# beside PostgreSQL; docs/operations.md has the rest.

FROM rust:1-bookworm AS builder
WORKDIR /src
# Code generation is pure Rust (protox), so no protoc; queries are checked at run time, so the
# build needs no database.
ENV CARGO_TERM_COLOR=never
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p jobwire-server \
    && install -D -m 0755 target/release/jobwire-server /out/jobwire-server

FROM debian:bookworm-slim
# postgresql: the binaries of the embedded default (the package must not create and start a
# cluster of its own). tini: PID 1 reaps the embedded cluster's postmaster, which pg_ctl detaches
# and which therefore becomes PID 1's child, and forwards SIGTERM to the server.
RUN mkdir -p /etc/postgresql-common/createcluster.d \
    && echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.d/jobwire.conf \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates postgresql tini \
    && rm -rf /var/lib/apt/lists/*
# PostgreSQL refuses to run as root, and so does this image.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/jobwire \
        --shell /usr/sbin/nologin jobwire
COPY --from=builder /out/jobwire-server /usr/local/bin/jobwire-server

USER jobwire
WORKDIR /var/lib/jobwire
ENV JOBWIRE_DATA_DIR=/var/lib/jobwire/data
VOLUME ["/var/lib/jobwire"]
EXPOSE 50051
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/jobwire-server"]
CMD ["--listen", "0.0.0.0:50051"]
