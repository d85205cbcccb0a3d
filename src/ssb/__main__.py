from ssb.cli import main

raise SystemExit(main())
