from cyrushelper.cli import main

raise SystemExit(main())
