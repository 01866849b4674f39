"""``python -m bgrl_dgl``; guarded so that worker processes importing it do not rerun it."""
from bgrl_dgl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
