"""The test kit: an ephemeral PostgreSQL cluster, MT5-like sample data and the demo.

Used by the tests, the benches and ``mt5backupd demo`` (which imports it lazily, only for that
command); never imported by the daemon or the receiver. Importing any module here has no side
effects: nothing is started, written or registered (the ``atexit`` hook that stops forgotten
servers is registered by the first server that starts, see :mod:`mt5backupd.testkit.reaper`).

* :mod:`~mt5backupd.testkit.pghost`: server binaries, the ``postgres`` OS account, processes,
  a free port
* :mod:`~mt5backupd.testkit.pgserver`: a cluster's life (initdb, start, stop, kill, destroy)
* :mod:`~mt5backupd.testkit.pgcluster`: ``PgCluster``, the server plus admin helpers (psql, roles)
* :mod:`~mt5backupd.testkit.reaper`: stops servers a process forgot, at interpreter exit
* :mod:`~mt5backupd.testkit.sampledata`: an MT5-like trading database of a chosen size
* :mod:`~mt5backupd.testkit.dbcontent`: row counts, checksums and sizes of a database
* :mod:`~mt5backupd.testkit.receiverproc`: ``mt5backupd receiver`` as a subprocess (tests, benches)
* :mod:`~mt5backupd.testkit.demo`: ``mt5backupd demo``
"""
