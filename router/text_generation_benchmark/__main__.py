import sys

from text_generation_benchmark.cli import main

sys.exit(main())
