import sys

from keras_unitscale.cli import main

sys.exit(main())
