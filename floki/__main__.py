from floki.cli import main

raise SystemExit(main())
