from mt5backupd.cli import entry

entry()
