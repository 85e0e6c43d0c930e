"""`python -m text_generation_launcher` runs the launcher."""

from .cli import main

main()
