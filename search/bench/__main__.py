"""`python -m search.bench`: see search.bench.cli."""
from search.bench.cli import main

raise SystemExit(main())
