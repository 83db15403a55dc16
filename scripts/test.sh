#!/usr/bin/env bash
# Set up (if needed), start the local Kafka broker, run the whole test suite, stop the broker.
# Extra arguments go to pytest. The broker is stopped even when tests fail, unless it was
# already running before this script (then it is yours, and it is left alone).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
./scripts/setup.sh || exit 1
CLI=(.venv/bin/linrec-stream)

if "${CLI[@]}" kafka status >/dev/null; then
    echo "test: using the broker that is already running"
else
    "${CLI[@]}" kafka start || exit 1
    trap '"${CLI[@]}" kafka stop' EXIT
fi

.venv/bin/python -m pytest "$@"
rc=$?
if [[ $rc -eq 5 ]]; then
    echo "test: pytest collected no tests; that is a failure" >&2
    rc=1
fi
exit $rc
