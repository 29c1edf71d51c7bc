#!/usr/bin/env bash
# A local S3 server whose ranged GETs cost what real stores' do (in proportion to the range), for
# `stablerep-bench offline --store-url`: LocalStack's S3 provider, run on the host (no Docker).
#
#   benchmarks/localstack_s3.sh PYTHON [PORT] [VENV]
#
# PYTHON: a Python >= 3.13 (LocalStack's code needs it; the project's own venv may be older).
# Creates VENV (default /tmp/stablerep-localstack) with the versions that start on a host without
# network, then serves S3 on 127.0.0.1:PORT (default 4599) in the foreground. In another shell:
#
#   export AWS_ENDPOINT_URL=http://127.0.0.1:4599 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1
#   python -c "import boto3; boto3.client('s3').create_bucket(Bucket='bench')"
#   stablerep-bench offline --no-s3 --store-url s3://bench/run1
set -euo pipefail
PYTHON=${1:?usage: benchmarks/localstack_s3.sh PYTHON [PORT] [VENV]}
PORT=${2:-4599}
VENV=${3:-/tmp/stablerep-localstack}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    # cbor2 >= 5.7 moved the module LocalStack imports; pyOpenSSL >= 24.3 dropped X509.add_extensions
    "$VENV/bin/pip" install -q "localstack-core[runtime]==2026.3.0" "cbor2<5.7" "cryptography<44" "pyopenssl<24.3" \
        "service_identity<24.2"
fi
export SERVICES=s3 GATEWAY_LISTEN="127.0.0.1:$PORT" LOCALSTACK_HOST="127.0.0.1:$PORT" DISABLE_EVENTS=1 \
    SKIP_SSL_CERT_DOWNLOAD=1
exec "$VENV/bin/python" -m localstack.runtime.main
