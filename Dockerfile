# The image of helm/vm-kernel-gateway (routers and VM hosts): Debian bookworm with what
# ./vmkg-dev installs (its apt list minus the browser-test packages, then the client and
# the server into a venv). `docker build -t REGISTRY/vmkg:TAG .`
# The guest image and template are not baked in: a host pulls them from the store
# (VMKG_STORE) or builds them on first use into its cache (debootstrap needs a Debian mirror).
FROM debian:bookworm-slim

RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      qemu-system-x86 qemu-utils gcc libc6-dev debootstrap busybox-static e2fsprogs cpio zstd \
      dpkg-dev procps python3 python3-venv python3-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY client/ client/
COPY pyproject.toml README.md ./
COPY gateway/ gateway/
COPY kernelmanager/ kernelmanager/
COPY guest/ guest/
# the client first: the server depends on it, and it is not on PyPI (as in ./vmkg-dev)
RUN python3 -m venv /opt/vmkg \
 && /opt/vmkg/bin/pip install -q --no-cache-dir ./client . \
 && rm -rf /src

ENV PATH=/opt/vmkg/bin:$PATH PYTHONDONTWRITEBYTECODE=1
WORKDIR /
EXPOSE 8888
ENTRYPOINT ["vmkg"]
CMD ["serve"]
