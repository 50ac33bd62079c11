"""`python -m jaxgen.cli ...` = `jaxgen ...`."""
import sys

from jaxgen.cli import main

sys.exit(main())
