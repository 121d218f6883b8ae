"""Mutation testing of the harness: a catalog of historical parallelism bugs, each re-introduced
into the engine by a monkeypatch applied inside the worker processes (``Worker.mutate``)."""

from harness.mutations.catalog import CATALOG, Mutation, get_mutation

__all__ = ["CATALOG", "Mutation", "get_mutation"]
