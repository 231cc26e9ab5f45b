# The imagebatch image: every app service in compose.yaml runs it with its own command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    IMAGEBATCH_DATA_DIR=/var/lib/imagebatch

RUN useradd --system --create-home --uid 10001 imagebatch \
    && install -d -o imagebatch -g imagebatch /var/lib/imagebatch

COPY . /src
RUN pip install /src && rm -rf /src

USER imagebatch
WORKDIR /var/lib/imagebatch
CMD ["imagebatch", "--help"]
