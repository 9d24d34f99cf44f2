import sys

from wan_model.cli import main

sys.exit(main())
