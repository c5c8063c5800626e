"""``python -m imagefm.train CONFIG [overrides...] [--resume]`` (also under torchrun)."""

from imagefm.train.launch import main

raise SystemExit(main())
