# Sourced by `make test`: find a MySQL/MariaDB server for the tests or start one, and
# export PAYMENTS_TEST_MYSQL_DSN (a server URL; each test run makes its own databases).
# Never skips: if no server can be had, it fails loudly.
#   1. PAYMENTS_TEST_MYSQL_DSN already set: use it.
#   2. A server on 127.0.0.1:3306 that lets root in without a password: use it.
#   3. Otherwise start a private mariadbd on 127.0.0.1:3407 with its data under var/,
#      installing Debian's mariadb-server first if it is missing.

_db_can_connect() {  # $1 = DSN
  "${PY:-.venv/bin/python}" - "$1" <<'PY' >/dev/null 2>&1
import sys, trio, trio_mysql
from payments.config import parse_mysql_dsn
d = parse_mysql_dsn(sys.argv[1])
async def main():
    c = trio_mysql.connect(host=d.host, port=d.port, user=d.user, password=d.password, connect_timeout=2)
    async with c:
        async with c.cursor() as cur:
            await cur.execute("SELECT 1")
trio.run(main)
PY
}

_db_start_private() {
  local root data port=3407
  root=$(pwd)/var/test-mariadb
  data=$root/data
  if ! command -v mariadbd >/dev/null 2>&1 && [ ! -x /usr/sbin/mariadbd ]; then
    echo "test-db: installing mariadb-server (Debian package)" >&2
    if [ "$(id -u)" = 0 ]; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q mariadb-server >/dev/null || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q mariadb-server >/dev/null; }
    else
      sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q mariadb-server >/dev/null
    fi
  fi
  mkdir -p "$root"
  if [ ! -d "$data/mysql" ]; then
    mariadb-install-db --no-defaults --datadir="$data" --auth-root-authentication-method=normal --user="$(id -un)" >"$root/install.log" 2>&1 \
      || { echo "test-db: mariadb-install-db failed, see $root/install.log" >&2; return 1; }
  fi
  /usr/sbin/mariadbd --no-defaults --datadir="$data" --port=$port --bind-address=127.0.0.1 \
    --socket="$root/mysqld.sock" --pid-file="$root/mysqld.pid" --user="$(id -un)" \
    >"$root/server.log" 2>&1 &
  for _ in $(seq 1 60); do
    _db_can_connect "mysql://root@127.0.0.1:$port/" && { export PAYMENTS_TEST_MYSQL_DSN="mysql://root@127.0.0.1:$port/"; return 0; }
    sleep 0.5
  done
  echo "test-db: private mariadbd did not come up, see $root/server.log" >&2
  return 1
}

if [ -n "${PAYMENTS_TEST_MYSQL_DSN:-}" ]; then
  _db_can_connect "$PAYMENTS_TEST_MYSQL_DSN" || { echo "test-db: cannot connect to PAYMENTS_TEST_MYSQL_DSN" >&2; return 1; }
elif _db_can_connect "mysql://root@127.0.0.1:3306/"; then
  export PAYMENTS_TEST_MYSQL_DSN="mysql://root@127.0.0.1:3306/"
elif _db_can_connect "mysql://root@127.0.0.1:3407/"; then
  export PAYMENTS_TEST_MYSQL_DSN="mysql://root@127.0.0.1:3407/"
else
  _db_start_private || { echo "test-db: no MySQL/MariaDB server could be found or started; tests need one" >&2; return 1; }
fi
echo "test-db: using ${PAYMENTS_TEST_MYSQL_DSN}" >&2
