# The proxy image the chart runs (images.proxy): python:3.11-slim with only what serving/ imports.
# Build from the repository root: make image
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# serving/ and the deploy/ modules it reads profiles with; the versions the tests ran with.
RUN pip install \
        "pydantic==2.14.4" \
        "PyYAML==6.0.4" \
        "prometheus-client==0.26.0" \
        "uvicorn==0.55.0" \
        "uvloop==0.23.0" \
        "httptools==0.9.0" \
        "aiohttp==3.14.5"

WORKDIR /app
COPY deploy/ deploy/
COPY serving/ serving/
COPY configs/models/ configs/models/

# Non-root, no home, nothing writable but /tmp (the chart mounts an emptyDir there and makes the
# root filesystem read-only).
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin proxy
USER 10001:10001

EXPOSE 8000
CMD ["python", "-m", "serving", "--config", "/etc/qwen-serve/proxy.yaml"]
