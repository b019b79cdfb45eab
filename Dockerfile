# syntax=docker/dockerfile:1
# Multi-stage build of the waltap binary.
#   docker build -t waltap .
#   docker run --rm -e DATABASE_URL=... -e WALTAP_API_KEYS='key = [{secret = "s", tables = ["*"], streams = true}]' \
#       -p 7373:7373 waltap serve --listen 0.0.0.0:7373
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the registry and build artefacts between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin waltap \
    && cp target/release/waltap /usr/local/bin/waltap

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 waltap
COPY --from=build /usr/local/bin/waltap /usr/local/bin/waltap
USER waltap
EXPOSE 7373
ENTRYPOINT ["waltap"]
CMD ["serve", "--listen", "0.0.0.0:7373"]
