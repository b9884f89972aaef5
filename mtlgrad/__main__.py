import sys

from mtlgrad.cli import main

sys.exit(main())
