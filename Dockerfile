# One image for txmon's api, worker, beat and flower containers (see docker-compose.yml).
FROM python:3.11-slim

# Production unless a deployment says otherwise: weak or development secrets stop start-up.
ENV TXMON_ENV=production \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so code changes do not reinstall them.
COPY requirements/ requirements/
RUN pip install --require-hashes -r requirements/base.lock

# The application. Copied by name rather than `COPY . .`, so a local .venv/ or var/ never
# ends up in the image.
COPY api_service/ api_service/
COPY shared/ shared/
COPY worker_service/ worker_service/
COPY migrations/ migrations/
COPY gunicorn.conf.py ./

RUN useradd --create-home --uid 10001 txmon && mkdir -p var && chown txmon var
USER txmon

EXPOSE 8000 5555 9808
CMD ["gunicorn", "-c", "gunicorn.conf.py", "api_service.wsgi:app"]
