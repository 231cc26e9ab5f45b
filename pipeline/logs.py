"""How the commands log: warnings and up on stderr by default, each record one line."""

from __future__ import annotations

import logging
import sys

# A line per HTTP request or per task is noise at hundreds of renders a second: -vv shows it.
CHATTY = ("httpx", "celery.worker.strategy", "celery.app.trace")


def configure_logging(verbose: int) -> None:
    """Warnings by default, -v info, -vv debug with transports' tracebacks and chatty loggers."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if verbose < 2:
        for handler in logging.getLogger().handlers:
            handler.addFilter(one_line_transport_logs)
    for chatty in CHATTY:
        logging.getLogger(chatty).setLevel(max(level, logging.WARNING) if verbose < 2
                                           else logging.DEBUG)


def one_line_transport_logs(record: logging.LogRecord) -> bool:
    """Celery's and kombu's records without their tracebacks (they stay one line; -vv shows
    them whole): the user's error, not a transport's stack, is what a command prints."""
    if record.name.startswith(("celery", "kombu", "amqp")) and record.exc_info:
        record.msg = f"{record.getMessage()} ({record.exc_info[1]!r})"
        record.args, record.exc_info, record.exc_text, record.stack_info = (), None, None, None
    return True
