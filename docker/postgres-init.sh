#!/bin/sh
# Runs once, when the postgres volume is new: the study and registry database next to Prefect's.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -c "CREATE DATABASE \"${MNIST_FLOW_DB:-mnist_flow}\" OWNER \"$POSTGRES_USER\""
