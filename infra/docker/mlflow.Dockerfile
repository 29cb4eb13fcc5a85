# syntax=docker/dockerfile:1
# MLflow tracking server with the PostgreSQL driver and the S3 client (boto3) that the shared
# server needs; the pipeline's own image does not carry them. Build from the repository root:
#
#   docker build -f infra/docker/mlflow.Dockerfile -t vae-mlflow:3.17.2 .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY requirements-dev.lock /tmp/requirements-dev.lock
# mlflow at the version the pipeline is locked to, so client and server agree; the driver and
# boto3 at the versions the tests run the server with (the dev lock: the multi-host test runs
# MLflow on PostgreSQL, the object-store tests on moto's S3).
RUN pip install -c /tmp/requirements-dev.lock mlflow psycopg2-binary boto3 \
    && useradd --create-home --uid 1000 mlflow

USER mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--help"]
