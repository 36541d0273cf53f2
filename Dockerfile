# mcp-sidecar in a container: one sidecar next to one MCP server (same pod or network).
#
#   docker build -t mcp-sidecar .
#   docker run -d --name mcp-sidecar -p 8080:8080 --stop-timeout 30 \
#     -v "$PWD/config.toml:/etc/mcp-sidecar/config.toml:ro" \
#     -v mcp-sidecar-data:/var/lib/mcp-sidecar mcp-sidecar
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the wheel is built from (.dockerignore keeps everything else out of the
# context); the sources are removed again once installed.
COPY pyproject.toml README.md /tmp/src/
COPY sidecar/ /tmp/src/sidecar/
RUN pip install --no-cache-dir /tmp/src \
    && rm -rf /tmp/src

# A fixed numeric uid, so orchestrators can check runAsNonRoot and volume ownership can
# be prepared on the host. The state directory is created and chowned before VOLUME:
# a fresh named volume is initialised from the image, ownership included.
RUN groupadd --system --gid 10001 mcp-sidecar \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin mcp-sidecar \
    && mkdir -p /etc/mcp-sidecar /var/lib/mcp-sidecar \
    && chown 10001:10001 /var/lib/mcp-sidecar \
    && chmod 0750 /var/lib/mcp-sidecar

# The config file is mounted here (read-only is fine). The environment overrides the
# file (SPEC 3.1), which pins two things a container needs whatever the file says:
# - the proxy listens on all interfaces, or nothing outside the container reaches it
#   (change the port with -e MCP_SIDECAR_SERVER__LISTEN=0.0.0.0:PORT);
# - the database is on the volume, so sessions survive a new container.
# The admin listener keeps its loopback default: the HEALTHCHECK runs inside the
# container, and /metrics and /sessions stay private unless admin.listen is set to
# 0.0.0.0:9091 together with admin.token (the sidecar refuses to start without one).
ENV MCP_SIDECAR_CONFIG=/etc/mcp-sidecar/config.toml \
    MCP_SIDECAR_SERVER__LISTEN=0.0.0.0:8080 \
    MCP_SIDECAR_STORE__PATH=/var/lib/mcp-sidecar/sessions.db

VOLUME /var/lib/mcp-sidecar
USER 10001:10001
WORKDIR /var/lib/mcp-sidecar

# 8080: the proxy (MCP clients). 9091: the admin API, reachable only if admin.listen
# is changed as described above.
EXPOSE 8080 9091

# slim has no curl; the interpreter is already there. urlopen raises (exit 1) on
# a refused connection, a timeout or any non-2xx status.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:9091/healthz', timeout=3)"]

# SIGTERM drains in-flight requests (up to server.drain_timeout) and flushes the store
# before exiting 0. Docker's default grace period is 10 s: allow more than the drain
# bound (docker run --stop-timeout 30, compose stop_grace_period: 30s), as the systemd
# unit does with TimeoutStopSec=30s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["mcp-sidecar"]
CMD ["serve"]
