from rewardbooth.mini.sheet import main

raise SystemExit(main())
