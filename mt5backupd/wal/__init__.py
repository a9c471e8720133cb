"""Continuous WAL for point-in-time recovery: ``receivewal`` supervises pg_receivewal (the child
that streams WAL into the local directory), ``shipper`` ships finished segments and snapshots
of the growing one through backup/'s spool -> sha256 -> resumable upload path, ``service`` runs
both inside the daemon. Names and LSNs are in the leaf ``mt5backupd.walnames``; the base backup's
spec is ``backup/basebackup``; restore is ``ops/pitr``.
"""
