import sys

from danceopd_cli.main import main

sys.exit(main())
