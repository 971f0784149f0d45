"""``python -m neurosem``: the same as the ``neurosem`` command."""
from neurosem.cli import main

if __name__ == "__main__":
    main()
