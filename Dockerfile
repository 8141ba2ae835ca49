# The hub's one image: daphne servers, Celery workers and beat run it with different commands.
# Build: docker build -t agent-hub .      Run: see docker-compose.yml and deploy/k8s/.

# --- Wheels, built where a compiler may be needed, so the final image carries none ------------
FROM python:3.11-slim AS wheels
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /build
COPY requirements.txt .
RUN pip wheel --wheel-dir /wheels -r requirements.txt

# --- Runtime ---------------------------------------------------------------------------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DJANGO_SETTINGS_MODULE=mcp_project.settings \
    HUB_PRODUCTION=1 \
    DJANGO_DEBUG=0 \
    HUB_LOG_FORMAT=json \
    HUB_VAR_DIR=/var/lib/hub

RUN groupadd --system --gid 10001 hub \
    && useradd --system --uid 10001 --gid hub --home-dir /app --shell /usr/sbin/nologin hub

COPY --from=wheels /wheels /wheels
COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-index --find-links=/wheels -r /tmp/requirements.txt \
    && rm -rf /wheels /tmp/requirements.txt

WORKDIR /app
# Owned by root: the service user can read the code but not change it.
COPY . .
# Static files are collected at build time and served by WhiteNoise from the image.
# The key only satisfies settings during the build; real ones come from the environment.
RUN DJANGO_SECRET_KEY=build-time-only-key-not-used-at-runtime-0000 HUB_PRODUCTION=0 \
        python manage.py collectstatic --noinput \
    && install -d -o hub -g hub /var/lib/hub

USER 10001:10001
EXPOSE 8000
STOPSIGNAL SIGTERM
# Liveness of the process; readiness (/readyz) is for the load balancer and Kubernetes.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
CMD ["python", "-m", "mcp_project.serve", "-b", "0.0.0.0", "-p", "8000", "--proxy-headers", "mcp_project.asgi:application"]
