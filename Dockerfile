# mproxy container image.
#
#   docker build -t mproxy .
#   docker network create apps
#   docker run -d --name proxy --network apps -p 80:80 -p 443:443 \
#       -v mproxy-config:/home/mproxy/.config/mproxy mproxy
#   docker exec proxy mproxy deploy web-1:3000     # web-1: a container on `apps`
#   docker logs -f proxy                            # JSON log lines, one per request
#   docker exec proxy mproxy upgrade                # replace the server in place (PID 1 stays)
#
# The last stage (mproxy) is the default build target. The `webapp` stage is the
# tiny example server used by compose.yaml (`build: {target: webapp}`).

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------
# Example web app for the compose demo (stdlib only, nothing to install).
FROM ${PYTHON_IMAGE} AS webapp
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PORT=3000
COPY examples/webapp.py /app/webapp.py
USER nobody
EXPOSE 3000
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/up' % os.environ.get('PORT', '3000'), timeout=2)"]
CMD ["python", "/app/webapp.py"]

# ---------------------------------------------------------------------------
# Build wheels (mproxy and its dependencies) in a throwaway stage, so the
# source tree and pip's build dependencies do not end up in the final image.
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS mproxy

# JSON log lines must reach `docker logs` as they are written.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --from=build /wheels /wheels
# The second step builds Twisted's plugin cache (twisted/plugins/dropin.cache)
# while we are still root; otherwise every start as the non-root user would try,
# and fail, to write it into site-packages.
RUN pip install --no-cache-dir --no-index --find-links=/wheels mproxy \
    && rm -rf /wheels \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && mproxy --version

# Run as an unprivileged user. State (mproxy.state and certs/) lives in the
# default state dir, ~/.config/mproxy, created here with the right owner and
# mode so a named volume mounted there starts out owned by this user.
RUN useradd --uid 1000 --user-group --create-home --home-dir /home/mproxy --shell /usr/sbin/nologin mproxy \
    && install -d -m 0700 -o mproxy -g mproxy /home/mproxy/.config /home/mproxy/.config/mproxy
USER mproxy:mproxy
WORKDIR /home/mproxy
VOLUME ["/home/mproxy/.config/mproxy"]

# Binding 80/443 as a non-root user: Docker (20.10+) starts containers with
# net.ipv4.ip_unprivileged_port_start=0, so any user may bind low ports inside
# the container's own network namespace; compose.yaml also sets that sysctl
# explicitly. (cap_add: NET_BIND_SERVICE alone would NOT help here: added
# capabilities are not granted to a non-root process.) On a runtime that keeps
# the kernel default (1024), either set that sysctl or run with
# `--http-port 8080 --https-port 8443` and publish 80:8080 / 443:8443.
EXPOSE 80 443

# Healthy when the server answers on its control socket.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["mproxy", "list"]

# PID 1 is mproxy itself (exec form, no shell): SIGTERM (docker stop) shuts it
# down gracefully, draining requests for up to 10 s (give docker stop a longer
# grace period, e.g. -t 30); SIGUSR2 (docker kill -s USR2) or
# `docker exec proxy mproxy upgrade` upgrades it in place, keeping PID 1.
CMD ["mproxy", "run"]
