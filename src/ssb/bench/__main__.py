"""``python -m ssb.bench OUT_DIR [--quick] [--sections ...]`` (see `ssb.bench.main`)."""

from ssb.bench import main

raise SystemExit(main())
