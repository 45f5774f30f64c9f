#!/usr/bin/env bash
# Start the Debian PostgreSQL cluster (no systemd here) and let root use it through the
# local socket (peer authentication), so tests can create their own throw-away databases.
set -euo pipefail
ver=$(ls /usr/lib/postgresql | sort -V | tail -1)
if ! pg_lsclusters -h | awk -v v="$ver" '$1==v && $2=="main"' | grep -q .; then
  pg_createcluster "$ver" main >/dev/null
fi
if ! pg_lsclusters -h | awk -v v="$ver" '$1==v && $2=="main" {print $4}' | grep -q online; then
  pg_ctlcluster "$ver" main start
fi
for _ in $(seq 50); do
  pg_isready -q && break
  sleep 0.2
done
if ! su postgres -c "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname='root'\"" | grep -q 1; then
  su postgres -c "createuser --superuser root"
fi
echo "pg-setup: PostgreSQL $ver is running; role root exists"
