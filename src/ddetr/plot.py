"""Learning curves of a run: ``python -m ddetr.plot RUN_DIR [--out PNG]`` (see ``ddetr.pictures.plots``)."""

from ddetr.pictures.plots import main

if __name__ == "__main__":
    main()
