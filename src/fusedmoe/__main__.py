import sys

from fusedmoe.cli import main

sys.exit(main())
