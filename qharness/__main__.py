from qharness.cli import main

raise SystemExit(main())
