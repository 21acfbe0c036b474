"""`python -m search.refit_best` (docs/refit.md): the documented command; the refit itself is search.refit.best."""
from search.refit.best import main  # run_cli-wrapped: a UserError is one line

if __name__ == "__main__":
    raise SystemExit(main())
