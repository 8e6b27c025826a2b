from mmdlm.train.train import main

raise SystemExit(main())
