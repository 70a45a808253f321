"""``python -m lightning_gd`` runs the ``lightning-gd`` command."""

from lightning_gd.cli import main

if __name__ == "__main__":
    main()
