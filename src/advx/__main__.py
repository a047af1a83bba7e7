"""``python -m advx`` (and ``torchrun -m advx``) runs the command line."""

from .cli import main

if __name__ == "__main__":
    main()
