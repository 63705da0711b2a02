"""Helpers every test suite shares: free ports, serving an app (in-process, on a socket in a thread), waiting
until it is ready, the settings the suites serve with (CPU provider, one thread), and synthetic preference rows of
two groups that disagree."""

from tests.support.net import closed_port_url, free_port
from tests.support.prefs import disagreeing_rows
from tests.support.serving import running_app, serve_app, serve_in_thread, wait_until_ready
from tests.support.settings import cpu_settings

__all__ = [
    "closed_port_url", "cpu_settings", "disagreeing_rows", "free_port", "running_app", "serve_app", "serve_in_thread",
    "wait_until_ready",
]
