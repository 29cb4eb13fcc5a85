"""Why these tests are not beside the code they test: each checks a promise that docs/reliability.md
makes to users, across modules, mostly through the `vae-pipeline` command line as a user meets it:
bad and fuzzed inputs, guards on what a command may write or replace, deadlines on the network,
tracking URIs MLflow cannot use, a moved repo, params' bounds, and the commands README.md and
docs/ show. docs/reliability.md cites them by path (test_reliability_doc.py checks that each
exists), and most share one workspace to damage (conftest.py: staged shards, a trained model and
a registered champion, built once per session).

A test of one module's behaviour belongs beside that module (tests/data, tests/training,
tests/registry, tests/orchestration, ...), even when it is about errors; put a test here when
it checks a promise of docs/reliability.md end to end, and cite it there."""
