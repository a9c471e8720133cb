from mt5backupd.cli import main

raise SystemExit(main())
