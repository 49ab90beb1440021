from kvmodel.cli import main

raise SystemExit(main())
