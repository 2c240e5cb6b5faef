"""`python -m niphas_builder`: the builder alone, as `niphas builder` runs it."""

import asyncio

from niphas_common.logs import configure_logging
from niphas_common.service import run_until_signalled
from niphas_common.settings import LogSettings

from .app import main

log_settings = LogSettings()
configure_logging(log_settings.level, log_settings.format)
asyncio.run(run_until_signalled(main))
