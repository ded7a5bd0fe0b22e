"""``python -m peftkit`` (and ``torchrun -m peftkit train CONFIG.yaml``): the command line."""

from .cli import main

main()
