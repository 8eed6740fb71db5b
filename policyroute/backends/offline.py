"""Backend addresses nothing listens on, for compiling without backends.

`lint`, `explain` and `--app` imports compile real steps with clients of these
addresses: clients connect lazily, so the steps compile and the clients are never used.
"""

OFFLINE_VALKEY_URL = "redis://127.0.0.1:1/0"
OFFLINE_PULSAR_URL = "pulsar://127.0.0.1:1"
