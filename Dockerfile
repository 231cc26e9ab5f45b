# The imagebatch image: every service in compose.yaml runs it with a different command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    IMAGEBATCH_DATA_DIR=/var/lib/imagebatch

RUN useradd --system --create-home --uid 10001 imagebatch \
    && mkdir -p /var/lib/imagebatch \
    && chown imagebatch:imagebatch /var/lib/imagebatch

WORKDIR /src
COPY . .
RUN pip install . && rm -rf /src/build

USER imagebatch
WORKDIR /var/lib/imagebatch
CMD ["imagebatch", "--help"]
