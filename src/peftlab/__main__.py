import sys

from peftlab import allocator
from peftlab.cli import main

try:
    allocator.ensure()  # ``python -m peftlab`` runs under the allocator the ``peftlab`` command picks
except ValueError as err:
    print(f"peftlab: error: {err}", file=sys.stderr)
    sys.exit(2)
sys.exit(main())
