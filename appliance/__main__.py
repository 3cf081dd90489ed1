"""``python -m appliance`` is ``inferbox``."""

from appliance.cli import main

main()
