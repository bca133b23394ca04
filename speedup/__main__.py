from speedup.cli import main

raise SystemExit(main())
