"""mt5backupd: streaming, verified, resumable backups of the MT5 trading database."""

__version__ = "0.1.0"
