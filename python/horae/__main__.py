import sys

from horae.cli import main

sys.exit(main())
