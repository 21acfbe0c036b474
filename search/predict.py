"""`python -m search.predict` (docs/refit.md): the documented command; the scoring itself is search.refit.predict."""
from search.refit.predict import main  # run_cli-wrapped: a UserError is one line

if __name__ == "__main__":
    raise SystemExit(main())
