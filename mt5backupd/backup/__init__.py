"""The byte path of one backup: dump, compress, spool, upload, pending uploads, and the run
that wires them together."""
