from mmdlm.train.train import exit_now, main

exit_now(main())
