"""`python -m sb2 ...` is the `sb2` command (what `accelerate launch -m sb2` runs on every GPU)."""

from sb2.cli import main

main()
