"""The console: the page a newcomer opens first (served by ``omni dev up``, ``CONSOLE_URL``)."""
