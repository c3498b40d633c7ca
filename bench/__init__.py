"""Benchmarks of the payments service: ``python -m bench`` (``make bench``).

Every figure is measured against the real ``payments serve`` process driven from
separate processes (wrk, h2load, the one-off job commands) and printed beside a ceiling
measured in the same run. See bench/README.md for the table and how to read it.
"""
