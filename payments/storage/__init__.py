"""Storage: one contract, two backends (MySQL/MariaDB and SQLite), and migrations.

``database`` is the contract the service is written against (and the errors it may
catch); ``backends.open_database`` picks the backend from the settings; the
repositories (repository, outbox, claims, provider_callbacks) are plain functions over
a connection, and the caller owns the transaction. Nothing is imported here, so
importing one repository loads no driver.
"""
