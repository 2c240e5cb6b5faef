"""`python -m niphas_chaos`: what `make chaos` runs (see niphas_chaos.cli)."""

from niphas_chaos.cli import main

main()
