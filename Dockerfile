# palisade in a small image: built in a Rust image, run from distroless as non-root.
#
#   docker build -t palisade .
#   docker run --rm -p 8080:8080 -p 9901:9901 palisade run -c /etc/palisade/palisade.toml
#
# docker-compose.yml uses this image for the proxy and for its three echo backends.

FROM rust:1-bookworm AS build
WORKDIR /src
# Manifests first: the dependency layer is rebuilt only when they change.
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked \
    && strip target/release/palisade

# glibc and libgcc, no shell, no package manager; runs as uid 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/palisade /usr/local/bin/palisade
COPY config/docker/palisade.toml /etc/palisade/palisade.toml
USER nonroot:nonroot
EXPOSE 8080 9901
ENTRYPOINT ["/usr/local/bin/palisade"]
CMD ["run", "-c", "/etc/palisade/palisade.toml", "--log-format", "json"]
