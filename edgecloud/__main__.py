"""``python -m edgecloud``."""

from edgecloud.main import main

main()
