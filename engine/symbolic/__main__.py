"""`python -m engine.symbolic [--write PATH | --check PATH]`."""
from .document import main

raise SystemExit(main())
