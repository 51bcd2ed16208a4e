# Container image for blockd: Debian 12 build stage, slim runtime stage, unprivileged user.
FROM debian:bookworm AS build
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      cmake ninja-build g++ pkg-config libcaf-dev libboost-json1.81-dev liburing-dev libgtest-dev googletest \
      zlib1g-dev libzstd-dev nettle-dev ca-certificates && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release && ninja -C /build blockd && strip /build/blockd

FROM debian:bookworm-slim
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      libcaf-core0.17 libcaf-io0.17 libboost-json1.81.0 liburing2 libnettle8 python3 && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/blockd --create-home blockd
COPY --from=build /build/blockd /usr/local/bin/blockd
COPY scripts/qmp-health /usr/local/bin/qmp-health
USER blockd
WORKDIR /var/lib/blockd
VOLUME /var/lib/blockd
# The health check asks the daemon itself: a QMP round trip on its monitor socket.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s CMD ["qmp-health", "/var/lib/blockd/qmp.sock"]
ENTRYPOINT ["blockd"]
CMD ["--chardev", "socket,id=qmp0,path=/var/lib/blockd/qmp.sock,server=on,wait=off", "--monitor", "chardev=qmp0"]
