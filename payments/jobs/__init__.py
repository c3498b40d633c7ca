"""The lifecycle workers (dispatcher, reconciler, expirer): actors run by the supervisor.

Each is usable three ways: as a supervised child inside ``serve`` (its ``run``), as a
one-off command that drains the backlog in batches, and as ``--worker`` repeating on
its interval.
"""
