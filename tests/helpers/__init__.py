"""Helpers shared by more than one test folder, each written once: small params
(params.py), file-tree hashes (files.py) and runs inside a private mount namespace
(mounts.py). Real servers and free ports are in tests/servers.py, registry snapshots in
tests/registry_state.py. A folder's own conftest.py keeps what only that folder uses."""
